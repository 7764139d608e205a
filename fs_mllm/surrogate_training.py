"""Independently trained surrogate encoders for the transfer protocol, made offline from the synthetic task.

Why: the paper's protocol crafts transfer images on encoders that are *not* the victim's tower (M-Attack's CLIP
ensemble, from the Hub). Offline, the only pretrained towers are the victim's own DINOv2, so these encoders are
trained here from random weights, on the project's own synthetic scenes (fs_mllm.synthetic: the shapes, colours,
counts, positions and words the VQA task asks about), with other architectures and seeds than the victim's: three
transformers ResNets (convolutional, batch-normalised; other widths, depths, block types and seeds), each with
linear heads on its pooled output (object, colour, position, count). The heads are dropped; each encoder is saved as a transformers folder (config.json, model.safetensors,
preprocessor_config.json), so it loads through :class:`fs_mllm.surrogates.HubSurrogate` like any Hub encoder and
its pooled output is the feature the transfer attack matches.

``python recipes/train_surrogates.py [OUT]`` retrains the shipped set (fs_mllm/weights/surrogates).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .synthetic import COLORS, POSITIONS, SHAPES, WORDS, make_dataset

SURROGATE_SIZE = 112  # the side the encoders are trained and fed at (fs-mini-llava's)
PIXEL_MEAN = PIXEL_STD = 0.5  # the normalisation they are trained with, saved in their preprocessor_config.json
SHIPPED_SURROGATES = Path(__file__).resolve().parent / "weights" / "surrogates"
OBJECTS = SHAPES + WORDS  # what is drawn: a shape or a word
LAYER_TYPES = ("basic", "bottleneck")
HEADS = {"object": len(OBJECTS), "color": len(COLORS), "position": len(POSITIONS), "count": 4}


@dataclass(frozen=True)
class SurrogateSpec:
    """One surrogate: a transformers ResNet (batch-normalised, so it learns in minutes on a CPU) of the given
    block type, widths and depths, and its training (images of the synthetic train split, epochs, seed)."""

    name: str
    seed: int
    layer_type: str = "basic"  # ResNet's "basic" (two 3x3 convolutions) or "bottleneck" (1x1, 3x3, 1x1) blocks
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    train_images: int = 4000
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {list(LAYER_TYPES)}, got {self.layer_type!r}")
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ValueError(f"widths and depths must be two tuples of one length per stage, got {self.widths!r} and {self.depths!r}")
        for name in ("train_images", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


SPECS = (
    SurrogateSpec("synthetic-resnet-a", seed=0),
    SurrogateSpec("synthetic-resnet-b", seed=1, widths=(24, 48, 96, 192), depths=(2, 2, 2, 2)),
    SurrogateSpec("synthetic-resnet-c", seed=2, layer_type="bottleneck", widths=(64, 128, 256, 512)),
)


def build_encoder(spec: SurrogateSpec) -> nn.Module:
    """A randomly initialised transformers ResNet for ``spec`` (its pooled output is the feature)."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(spec.seed)
    return ResNetModel(ResNetConfig(embedding_size=spec.widths[0], hidden_sizes=list(spec.widths), depths=list(spec.depths),
                                    layer_type=spec.layer_type))


def _labels(meta: dict) -> list[int]:
    obj = meta["shape"] if meta["kind"] == "shapes" else meta["word"]
    count = meta["count"] - 1 if meta["kind"] == "shapes" else -100  # a word has no count: ignored by the loss
    return [OBJECTS.index(obj), list(COLORS).index(meta["color"]), POSITIONS.index(meta["position"]), count]


def synthetic_tensors(n: int, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic scenes of ``split`` at SURROGATE_SIZE as [0,1] float (n, 3, S, S) and their labels (n, 4)."""
    examples = make_dataset(n, split=split, seed=seed, size=SURROGATE_SIZE)
    images = torch.from_numpy(np.stack([np.asarray(e.image.convert("RGB")) for e in examples])).permute(0, 3, 1, 2)
    return images.float() / 255, torch.tensor([_labels(e.meta) for e in examples])


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(encoder.config.hidden_sizes[-1], classes) for classes in HEADS.values())

    def forward(self, images01: torch.Tensor) -> list[torch.Tensor]:
        pooled = self.encoder(pixel_values=(images01 - PIXEL_MEAN) / PIXEL_STD).pooler_output.flatten(1)
        return [head(pooled) for head in self.heads]


def _accuracy(model: _Classifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = [torch.cat(parts) for parts in zip(*(model(images[i:i + 256]) for i in range(0, len(images), 256)))]
    out = {}
    for (head, _), scores, target in zip(HEADS.items(), logits, labels.T):
        keep = target >= 0
        out[head] = float((scores.argmax(-1)[keep] == target[keep]).float().mean())
    return out


def train_surrogate(spec: SurrogateSpec, out_dir: Union[str, os.PathLike], progress: bool = True) -> dict:
    """Train ``spec`` on the synthetic train split, save the encoder (no heads) to ``out_dir/spec.name`` and
    return its record (held-out accuracy per head on 500 scenes, seconds, parameters)."""
    from tqdm.auto import tqdm
    from transformers import ViTImageProcessor

    start = time.time()
    images, labels = synthetic_tensors(spec.train_images, "train")
    held_images, held_labels = synthetic_tensors(500, "heldout")
    model = _Classifier(build_encoder(spec))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05)
    steps = spec.epochs * math.ceil(len(images) / spec.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(spec.seed)
    with tqdm(total=steps, desc=spec.name, disable=not progress) as bar:
        for _ in range(spec.epochs):
            model.train()
            for batch in torch.randperm(len(images), generator=generator).split(spec.batch_size):
                logits = model(images[batch])
                loss = sum(F.cross_entropy(scores, target, ignore_index=-100) for scores, target in zip(logits, labels[batch].T))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    record = {"spec": asdict(spec), "heldout_accuracy": _accuracy(model, held_images, held_labels),
              "parameters": sum(p.numel() for p in model.encoder.parameters()),
              "seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads()}
    folder = Path(out_dir) / spec.name
    model.encoder.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": SURROGATE_SIZE, "width": SURROGATE_SIZE}, image_mean=[PIXEL_MEAN] * 3,
                      image_std=[PIXEL_STD] * 3).save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def train_shipped_surrogates(out_dir: Optional[Union[str, os.PathLike]] = None) -> list[dict]:
    """Train every surrogate of SPECS into ``out_dir`` (default: the shipped folder); their records."""
    return [train_surrogate(spec, out_dir or SHIPPED_SURROGATES) for spec in SPECS]

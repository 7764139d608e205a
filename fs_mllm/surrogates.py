"""Surrogate encoders for the transfer protocol: [0,1] images -> features (B, T, D), differentiable.

The paper's protocol (M-Attack) crafts on an ensemble of CLIP encoders that are *not* the victim's tower;
crafting on the victim's own undefended path (``"model"``) is the stronger, grey-box case. Names:

- ``"model"``: the attacked model's own undefended image path (built by :func:`fs_mllm.attacks.attack`).
- ``"dinov2"``: the DINOv2 ViT-S/14 shipped offline, all patch tokens at the input resolution. It is the
  tower of fs-mini-llava, so against that model it is grey-box too.
- ``"dinov2-cls112"``: the same weights at 112 px with the CLS token only: another resolution and pooling.
- ``"synthetic-resnet-a"``, ``"synthetic-resnet-b"``, ``"synthetic-resnet-c"``: convolutional encoders *not*
  related to any victim, trained here from random weights on the synthetic task (fs_mllm.surrogate_training, shipped in
  fs_mllm/weights/surrogates); ``"synthetic"`` is the three as an ensemble, the offline stand-in for M-Attack's.
- ``"m-attack"``: M-Attack's ensemble, :data:`M_ATTACK_SURROGATES` (three CLIP encoders from the Hub).
- any other string: a transformers vision or dual encoder by Hub id or local folder (CLIP, SigLIP, DINOv2,
  ...), loaded with ``from_pretrained`` from safetensors only; its image embedding (CLIP's projected
  ``image_embeds``, else the pooled output) at its own resolution and mean/std (preprocessor_config.json).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .image_io import processor_size
from .surrogate_training import SHIPPED_SURROGATES, SPECS

SYNTHETIC_SURROGATES = tuple(spec.name for spec in SPECS)  # trained offline on the synthetic task, shipped
BUILT_IN_SURROGATES = ("model", "dinov2", "dinov2-cls112") + SYNTHETIC_SURROGATES
# M-Attack (Li et al. 2025): ViT-B/16, ViT-B/32 and LAION ViT-g/14, crafted at linf 16/255 with local crops
M_ATTACK_SURROGATES = ("openai/clip-vit-base-patch16", "openai/clip-vit-base-patch32",
                       "laion/CLIP-ViT-g-14-laion2B-s12B-b42K")
ENSEMBLES = {"m-attack": M_ATTACK_SURROGATES, "synthetic": SYNTHETIC_SURROGATES}

__all__ = ["BUILT_IN_SURROGATES", "ENSEMBLES", "HubSurrogate", "M_ATTACK_SURROGATES", "SYNTHETIC_SURROGATES",
           "check_surrogates", "expand_surrogates", "surrogate_encoder"]


def expand_surrogates(names: Optional[Sequence[Any]]) -> Optional[list]:
    """``names`` with each ensemble name (``"m-attack"``) replaced by its members; None stays None.

    Raises:
        ValueError: ``names`` is a single string, or holds an empty name.
    """
    if names is None:
        return None
    if isinstance(names, str):
        raise ValueError(f"surrogates must be a list of names or encoders, got the string {names!r}; "
                         f"write [{names!r}]")
    expanded: list = []
    for name in names:
        if isinstance(name, str) and not name.strip():
            raise ValueError("surrogates: an empty name; give built-in names, Hub ids or folders")
        expanded.extend(ENSEMBLES.get(name, (name,)) if isinstance(name, str) else (name,))
    return expanded


def check_surrogates(names: Optional[Sequence[Any]]) -> Optional[list]:
    """:func:`expand_surrogates`, and every name that is not built in resolved to a config and a
    preprocessor_config.json (a local folder, the HF cache, or the Hub when online), so that a misspelt or
    missing encoder is refused before any crafting; encoder modules pass as they are.

    Raises:
        ValueError: a name that resolves to nothing, with the fix.
    """
    expanded = expand_surrogates(names)
    for name in expanded or ():
        if isinstance(name, str) and name not in BUILT_IN_SURROGATES:
            _resolve(name)
    return expanded


def check_ensemble_weighting(weighting: str, surrogates: Optional[Sequence[Any]]) -> None:
    """A weighting other than 'mean' weighs the members of ``surrogates``: refused without them, where it
    would change nothing and a stored setting would claim what did not run."""
    if weighting != "mean" and not surrogates:
        raise ValueError(f"ensemble_weighting={weighting!r} weighs the members of surrogates; give them "
                         "(e.g. surrogates=('m-attack',)), or leave it at 'mean'")


def _resolve(name_or_folder: str) -> str:
    """The path of ``name_or_folder``'s preprocessor_config.json, its config.json resolved too."""
    from transformers.utils import cached_file

    try:
        cached_file(name_or_folder, "config.json")
        return cached_file(name_or_folder, "preprocessor_config.json")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"surrogates: {name_or_folder!r} is neither built in {list(BUILT_IN_SURROGATES)}, an ensemble "
            f"{list(ENSEMBLES)}, nor a transformers encoder with config.json and preprocessor_config.json "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160]}); offline, download it first into the HF "
            "cache or save it to a folder (model.save_pretrained and processor.save_pretrained)") from None


@functools.lru_cache(maxsize=4)
def surrogate_encoder(name: str) -> nn.Module:
    """A frozen surrogate encoder for ``name`` (see the module doc); ``"model"`` is built by the attack. The last
    few loaded are kept (one load per run, not one per budget); the module is shared, so do not train it.

    Raises:
        ValueError: ``"model"`` or an ensemble name (expand it first), or a name that is neither built in
            nor loadable (with the loader's reason and the fix).
    """
    from .booster.encoders import PixelEncoder, freeze

    if name in ("model",) + tuple(ENSEMBLES):
        raise ValueError(f"surrogates: {name!r} is not one encoder (see fs_mllm.surrogates.expand_surrogates)")
    if name in ("dinov2", "dinov2-cls112"):
        from .models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2

        if name == "dinov2":
            return freeze(PixelEncoder(load_dinov2(), IMAGENET_MEAN, IMAGENET_STD, drop_tokens=1))
        return freeze(HubSurrogate(load_dinov2(), IMAGENET_MEAN, IMAGENET_STD, size=112, name=name))
    if name in SYNTHETIC_SURROGATES:
        return freeze(HubSurrogate.from_pretrained(str(SHIPPED_SURROGATES / name)))
    return freeze(HubSurrogate.from_pretrained(name))


class HubSurrogate(nn.Module):
    """A transformers image encoder as [0,1] images (B, 3, H, W) -> its image embedding (B, 1, D).

    Images are resized (bilinear, differentiable) to the encoder's resolution and normalised with its mean/std,
    as its processor would; a dual encoder (CLIP, SigLIP) gives its projected image embedding, a vision model its
    pooled output (DINOv2: the CLS token after the final layer norm). Not a booster.encoders.PixelEncoder (which
    returns tokens), so that importing fs_mllm does not load the booster's training code.
    """

    def __init__(self, model: nn.Module, image_mean: Sequence[float], image_std: Sequence[float], size: int,
                 name: str = "", interpolate: bool = False) -> None:
        super().__init__()
        self.model, self.size, self.name = model, int(size), name
        self.interpolate = interpolate  # fed at another size than its config's: interpolate its position embeddings
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, name_or_folder: str) -> "HubSurrogate":
        """Load by Hub id (or the HF cache when offline) or local folder, from safetensors weights only."""
        from transformers import AutoConfig, AutoModel

        from .hub.io import load_safetensors_model

        processor_file = _resolve(name_or_folder)
        config = AutoConfig.from_pretrained(name_or_folder)
        with open(processor_file, encoding="utf-8") as handle:
            processor = json.load(handle)
        vision = getattr(config, "vision_config", None) or config
        size = processor_size(processor) or getattr(vision, "image_size", None)
        if not isinstance(size, int) or "image_mean" not in processor or "image_std" not in processor:
            raise ValueError(f"surrogates: {name_or_folder!r} states no int image_size in its config or no image_mean/"
                             "image_std in its preprocessor_config.json; fs_mllm cannot feed it as its processor would")
        model = load_safetensors_model(AutoModel, name_or_folder, dtype=torch.float32)
        return cls(model, processor["image_mean"], processor["image_std"], size, name=str(name_or_folder),
                   interpolate=size != getattr(vision, "image_size", size))

    def forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        """(B, ..., 3, H, W) [0,1] images -> (B, N, D): one embedding per image of each row (N = 1 for (B, 3, H, W))."""
        images = pixels01.float().reshape((-1,) + tuple(pixels01.shape[-3:]))
        if tuple(images.shape[-2:]) != (self.size, self.size):
            images = nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((images - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        encode = getattr(self.model, "get_image_features", None)  # a dual encoder's projected image embedding
        encode = encode if callable(encode) else self.model
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate and "interpolate_pos_encoding" in \
            inspect.signature(encode).parameters else {}
        out = encode(pixel_values=x, **kwargs)
        embedding = out if isinstance(out, torch.Tensor) else out.pooler_output
        if embedding.ndim == 4:  # a convolutional tower's pooled map (B, C, 1, 1)
            embedding = embedding.flatten(1)
        return embedding.float().reshape(pixels01.shape[0], -1, embedding.shape[-1])

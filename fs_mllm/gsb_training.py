"""Training of the Gaussian Smoothness Booster, with the frozen encoder, through ``accelerate``.

Two stages (DESIGN section 3), one global step counter:
1. denoiser: MSE to the clean image (divided by sigma^2 so every noise level counts) plus feature
   consistency 1 - cos(f(D(x+e)), f(x)) through the frozen encoder;
2. mapper: consistency 1 - cos(z_m(x+e), f(x)), identity ||M(z, 0)||^2 / ||z||^2 on clean inputs and
   per-dimension mean/std matching of mapped noisy features against clean features.
Both stages are told ``booster.noise_level(noisy, sigma)``, as at inference (with the default
``noise_level="estimated"`` that is the noise measured on the input, ~0 for a clean one). A fraction
``clean_fraction`` of each batch is fed without noise with the clean target, so the boosted encoder
keeps clean features (its certificate is about f_b(x) and that should be f(x)).

The same code runs on CPU, one GPU or several (``accelerate launch``): data come from a map-style
dataset of seeded random crops that accelerate shards, noise from a generator seeded by (seed, step,
process). Checkpoints are safetensors + JSON (weights, flattened optimizer state, step): kill and rerun
with the same arguments to resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import CertifyConfig, SEED_LIMIT, check_seed, check_sigma
from . import image_io
from .gsb import CONFIG_NAME, NOISE_LEVELS, WEIGHTS_NAME, GaussianSmoothnessBooster, GSBConfig
from .image_io import to_float_rgb
from .smoothing import unit_features

Encoder = Callable[[torch.Tensor], torch.Tensor]

# Real photos available offline (DESIGN section 7). Held-out photos are never used for training.
HELDOUT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "china", "flower", "grace_hopper")
TRAIN_PHOTOS = (
    "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle_left", "stereo_motorcycle_right",
    "colorwheel", "logo", "camera", "brick", "grass", "gravel", "moon", "clock", "coins", "text", "page", "cell",
    "mpl_logo2", "mpl_minduka",
)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def offline_photo(name: str) -> np.ndarray:
    """One of the real photos that ship with scikit-image / scikit-learn / matplotlib, as (H, W, 3) float."""
    return to_float_rgb(image_io.offline_photo(name))


def load_image_folder(path: Union[str, os.PathLike]) -> list[np.ndarray]:
    """All images (png/jpg/jpeg/bmp/webp/tif) in a folder, recursively, as float RGB arrays."""
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
    if not files:
        raise ValueError(f"image folder {str(folder)!r} holds no images")
    return [to_float_rgb(Image.open(p)) for p in files]


def load_image_dataset(name_or_path: str, split: str = "train", image_column: str = "image", limit: Optional[int] = None) -> list[np.ndarray]:
    """Images of a ``datasets`` dataset (local path or cached name) as float RGB arrays."""
    import datasets

    data = datasets.load_dataset(name_or_path, split=split) if not os.path.isdir(name_or_path) else datasets.load_from_disk(name_or_path)
    if hasattr(data, "keys") and split in data:
        data = data[split]
    if image_column not in data.column_names:
        raise ValueError(f"image_column {image_column!r} not in dataset columns {data.column_names}")
    count = len(data) if limit is None else min(limit, len(data))
    return [to_float_rgb(data[i][image_column]) for i in range(count)]


def resize_square(image: np.ndarray, size: int) -> torch.Tensor:
    """Centre-crop to a square and resize (bicubic, antialiased) to (3, size, size) in [0,1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    h, w = tensor.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    tensor = tensor[:, top:top + side, left:left + side]
    out = F.interpolate(tensor[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(0, 1)


def heldout_images(size: int, names: Sequence[str] = HELDOUT_PHOTOS) -> torch.Tensor:
    """The held-out real photos, centre-cropped and resized: (len(names), 3, size, size)."""
    return torch.stack([resize_square(offline_photo(n), size) for n in names])


def seeded_generator(seed: int, device: Any = None) -> torch.Generator:
    """A generator for a derived seed (seed * k + step ...), folded into torch's range so a large user seed
    cannot overflow manual_seed; identical to manual_seed(seed) for every seed below 2**63."""
    return torch.Generator(device=device).manual_seed(seed % SEED_LIMIT)


class RandomCropDataset(torch.utils.data.Dataset):
    """Seeded random crops (scale 0.15-1 of the short side), flips and colour jitter of a list of images.

    Item i is a pure function of (seed, i), so a resumed run (offset) continues with fresh crops and
    accelerate can shard the indices over processes.
    """

    def __init__(self, images: Sequence[np.ndarray], size: int, length: int, seed: int = 0, offset: int = 0, augment: bool = True) -> None:
        if not images:
            raise ValueError("images must hold at least one image")
        self.images = [torch.from_numpy(np.ascontiguousarray(to_float_rgb(im))).permute(2, 0, 1) for im in images]
        self.size, self.length, self.seed, self.offset, self.augment = size, length, seed, offset, augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        g = seeded_generator(self.seed * 1_000_003 + self.offset + index)
        image = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
        h, w = image.shape[1:]
        short = min(h, w)
        scale = float(torch.empty(1).uniform_(0.15, 1.0, generator=g)) if self.augment else 1.0
        side = max(8, int(short * scale))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = image[:, top:top + side, left:left + side]
        crop = F.interpolate(crop[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        if self.augment:
            if torch.rand(1, generator=g) < 0.5:
                crop = crop.flip(-1)
            brightness, contrast, saturation = (torch.empty(3).uniform_(0.7, 1.3, generator=g)).tolist()
            gray = crop.mean(0, keepdim=True)
            crop = gray + (crop - gray) * saturation
            crop = (crop - crop.mean()) * contrast + crop.mean() * brightness
        return crop.clamp(0, 1)


# ------------------------------------------------------------------------------------------------
# encoders
# ------------------------------------------------------------------------------------------------
class PixelEncoder(nn.Module):
    """Wrap a Hugging Face vision model as encoder([0,1] pixels) -> image features.

    Normalises with the processor mean/std, returns ``last_hidden_state`` without the first
    ``drop_tokens`` tokens (e.g. 1 to drop the CLS token and keep all patch tokens).
    """

    def __init__(self, model: nn.Module, image_mean: Sequence[float], image_std: Sequence[float], drop_tokens: int = 1) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.drop_tokens = drop_tokens

    def forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        x = (pixels01.float() - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=x.to(dtype)).last_hidden_state[:, self.drop_tokens:]


def freeze(module: Any) -> Any:
    """Frozen means no parameter receives gradients and dropout is off; gradients still flow to inputs."""
    if isinstance(module, nn.Module):
        module.eval()
        module.requires_grad_(False)
    return module


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image cosine of flattened features (global mode), float32."""
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1, eps=1e-8)


def stats_matching_loss(mapped: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-dimension mean/std of mapped features vs clean features (pooled over batch and tokens)."""
    m = mapped.float().reshape(-1, mapped.shape[-1])
    c = clean.float().reshape(-1, clean.shape[-1])
    c_std = c.std(0) + 1e-4
    mean_term = ((m.mean(0) - c.mean(0)) / c_std).pow(2).mean()
    std_term = (torch.log(m.std(0) + 1e-4) - torch.log(c_std)).pow(2).mean()
    return mean_term + std_term


def identity_loss(booster_mapper: nn.Module, clean: torch.Tensor) -> torch.Tensor:
    """||M(z, 0)||^2 relative to ||z||^2: the mapper must leave noise-free features alone."""
    zero = torch.zeros(clean.shape[0], device=clean.device)
    residual = booster_mapper.residual(clean, zero) if hasattr(booster_mapper, "residual") else booster_mapper(clean, zero) - clean.float()
    return (residual.float().pow(2).flatten(1).sum(1) / clean.float().pow(2).flatten(1).sum(1).clamp_min(1e-8)).mean()


# ------------------------------------------------------------------------------------------------
# config + checkpoints
# ------------------------------------------------------------------------------------------------
@dataclass
class GSBTrainConfig:
    """Training settings. Steps are global optimiser steps (per process batch = batch_size).

    sigma_min/sigma_max: training noise range (defaults to the booster's). clean_fraction: share of
    each batch fed without noise (target: identity). clean_weight: weight of those noise-free samples in
    the per-sample losses (denoiser MSE + feature consistency, mapper consistency; noisy samples weigh 1,
    so 1.0 is the plain batch mean). With ``noise_level="estimated"`` a clean input is told ~0 and passes
    almost unchanged anyway, so the default is 0 (every sample noisy); a booster told the given sigma
    cannot know an input is clean, and there raising clean_fraction/clean_weight trades smoothing for
    clean utility cos(f_b(x), f(x)). checkpoint_every: steps between checkpoints.
    feature_every: stage 1 adds the feature-consistency term (a backward pass through the frozen encoder,
    the expensive part) on every k-th step only; the other steps are MSE only (0: never, 1: always).
    mapper_cache_size: when > 0, stage 2 first encodes this many (clean, noisy+denoised) crops once (the
    encoder and denoiser are frozen in stage 2, so their features are fixed) and then trains the mapper on
    minibatches of ``mapper_batch_size`` drawn from that cache: far fewer encoder calls, at the price of
    a finite set of noise draws. 0: fresh crops and noise every step.
    """

    denoiser_steps: int = 200
    mapper_steps: int = 200
    batch_size: int = 8
    denoiser_lr: float = 1e-3
    mapper_lr: float = 1e-3
    mse_weight: float = 1.0
    feature_weight: float = 1.0
    consistency_weight: float = 1.0
    identity_weight: float = 1.0
    stats_weight: float = 0.1
    clean_fraction: float = 0.0
    clean_weight: float = 1.0
    feature_every: int = 1
    mapper_cache_size: int = 0
    mapper_batch_size: int = 32
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    image_size: int = 112
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.seed = check_seed(self.seed)
        for name in ("denoiser_steps", "mapper_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("feature_every", "mapper_cache_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("batch_size", "mapper_batch_size", "image_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("denoiser_lr", "mapper_lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("mse_weight", "feature_weight", "consistency_weight", "identity_weight", "stats_weight", "clean_weight", "grad_clip"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.clean_fraction < 1.0:
            raise ValueError(f"clean_fraction must lie in [0, 1), got {self.clean_fraction!r}")
        if self.sigma_min is not None:
            self.sigma_min = check_sigma(self.sigma_min, "sigma_min")
        if self.sigma_max is not None:
            self.sigma_max = check_sigma(self.sigma_max, "sigma_max")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON part (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            name = f"state.{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_OPTIM = "optimizer.safetensors"


def _checkpoint_copies(folder: Path) -> tuple[Path, Path, Path]:
    """(tmp, folder, old): the copies a save can leave, newest first (see :func:`save_checkpoint`)."""
    return folder.with_name(folder.name + ".tmp"), folder, folder.with_name(folder.name + ".old")


def _is_complete(copy: Path) -> bool:
    """The state JSON is written last, so a copy whose state parses was written completely."""
    try:
        json.loads((copy / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return False
    return all((copy / name).is_file() for name in (CHECKPOINT_OPTIM, WEIGHTS_NAME, CONFIG_NAME))


def _newest_complete_copy(folder: Path) -> Optional[Path]:
    return next((copy for copy in _checkpoint_copies(folder) if _is_complete(copy)), None)


def _settle_checkpoint(folder: Path) -> None:
    """Finish a save that a kill interrupted: the newest complete copy becomes ``folder``, the rest go.

    Nothing complete is deleted before the newest copy is in place, so a kill here is recoverable too.
    """
    tmp, _, old = _checkpoint_copies(folder)
    newest = _newest_complete_copy(folder)
    if newest is not None and newest != folder:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(newest, folder)
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)


def save_checkpoint(folder: Union[str, os.PathLike], booster: GaussianSmoothnessBooster, optimizer: torch.optim.Optimizer, step: int, stage: str, history: list, seconds: float = 0.0,
                    train_config: Optional[dict] = None) -> Path:
    """Weights + optimizer state (safetensors) + step/stage/history/seconds/train config (JSON), crash-safe.

    Writes ``folder.tmp`` completely (state JSON last), renames folder -> folder.old and folder.tmp ->
    folder, then deletes folder.old. A kill at any point leaves at least one complete copy, which
    :func:`load_checkpoint_state` resumes from and the next save settles.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp, _, old = _checkpoint_copies(folder)
    _settle_checkpoint(folder)
    booster.save_pretrained(tmp)
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(tmp / CHECKPOINT_OPTIM))
    (tmp / CHECKPOINT_STATE).write_text(json.dumps({"step": step, "stage": stage, "seconds": seconds, "optimizer": meta, "history": history,
                                                   "train_config": train_config}, indent=1))
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_checkpoint_state(folder: Union[str, os.PathLike]) -> Optional[dict]:
    """The JSON state and optimizer tensors of the newest complete checkpoint copy, or None when there is none.

    ``state["path"]`` is the copy read (``folder`` itself, or its ``.tmp``/``.old`` sibling after a kill
    during a save). Read-only, so every process of a distributed run can call it.
    """
    from safetensors.torch import load_file

    copy = _newest_complete_copy(Path(folder))
    if copy is None:
        return None
    state = json.loads((copy / CHECKPOINT_STATE).read_text())
    state["optimizer_tensors"] = load_file(str(copy / CHECKPOINT_OPTIM))
    state["path"] = str(copy)
    return state


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _sample_noise(clean: torch.Tensor, train: GSBTrainConfig, lo: float, hi: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image sigma ~ U[lo, hi], noisy copy; the first clean_fraction of the batch gets no noise."""
    b = clean.shape[0]
    sigma = torch.empty(b, device=clean.device).uniform_(lo, hi, generator=generator)
    noise = torch.randn(clean.shape, device=clean.device, generator=generator, dtype=torch.float32)
    n_clean = int(round(train.clean_fraction * b)) if b > 1 else 0
    amplitude = sigma.clone()
    amplitude[:n_clean] = 0.0
    noisy = clean.float() + noise * amplitude.reshape(-1, 1, 1, 1)
    return noisy, sigma, amplitude


def _build_feature_cache(booster: GaussianSmoothnessBooster, encoder: Encoder, train_images: Any, train: GSBTrainConfig,
                         lo: float, hi: float, accelerator: Any) -> dict[str, torch.Tensor]:
    """Encode ``mapper_cache_size`` crops once: clean features, features of denoised noisy copies, levels told.

    Seeded by (seed, process index) only, so a resumed run rebuilds the same cache.
    """
    from tqdm.auto import tqdm

    device = accelerator.device
    size = train.mapper_cache_size
    if isinstance(train_images, torch.utils.data.Dataset):
        g = seeded_generator(train.seed + 17 + accelerator.process_index)
        picks = torch.randint(len(train_images), (size,), generator=g).tolist()
        dataset = torch.utils.data.Subset(train_images, picks)
    else:
        dataset = RandomCropDataset(train_images, train.image_size, length=size, seed=train.seed + 17,
                                    offset=(1 + accelerator.process_index) * 10_000_019)
    loader = torch.utils.data.DataLoader(dataset, batch_size=train.batch_size, shuffle=False)
    parts: dict[str, list] = {"target": [], "z": [], "level": [], "amplitude": []}
    bar = tqdm(loader, desc="gsb feature cache", disable=not accelerator.is_local_main_process)
    with torch.no_grad(), accelerator.autocast():
        for index, clean in enumerate(bar):
            clean = clean.to(device)
            generator = seeded_generator(train.seed * 7_919 + 1_000_003 * (index + 1) + accelerator.process_index, device)
            noisy, sigma, amplitude = _sample_noise(clean, train, lo, hi, generator)
            level = booster.noise_level(noisy, sigma)
            den = booster.denoiser(noisy, level) if booster.denoiser is not None else noisy
            parts["target"].append(encoder(clean).float())
            parts["z"].append(encoder(den).float())
            parts["level"].append(level)
            parts["amplitude"].append(amplitude)
    return {k: torch.cat(v) for k, v in parts.items()}


def train_gsb(
    booster: GaussianSmoothnessBooster,
    encoder: Encoder,
    train_images: Union[Sequence[np.ndarray], torch.utils.data.Dataset],
    train_config: Optional[GSBTrainConfig] = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    accelerator: Any = None,
    progress: bool = True,
) -> dict:
    """Train ``booster`` around the frozen ``encoder`` in two stages; resume from ``output_dir``/checkpoint.

    train_images: a list of photos (random crops/flips/jitter at ``image_size`` are drawn from them) or a
    map-style dataset returning (3, H, W) [0,1] tensors. Returns {"step", "history", "seconds" (this run),
    "seconds_total" (including resumed runs, up to their last checkpoint)}; the
    trained weights are also saved to ``output_dir/final`` when ``output_dir`` is given.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    train = train_config or GSBTrainConfig()
    if not isinstance(booster, GaussianSmoothnessBooster):
        raise ValueError(f"booster must be a GaussianSmoothnessBooster, got {type(booster).__name__}")
    if not callable(encoder):
        raise ValueError("encoder must be callable: encoder([0,1] pixels (B,3,H,W)) -> features")
    lo = train.sigma_min if train.sigma_min is not None else booster.config.sigma_min
    hi = train.sigma_max if train.sigma_max is not None else booster.config.sigma_max
    if lo > hi:
        raise ValueError(f"sigma_min ({lo}) must be <= sigma_max ({hi})")
    booster.check_compatible(booster.config.feature_dim, lo)
    booster.check_compatible(booster.config.feature_dim, hi)
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    freeze(encoder)
    if isinstance(encoder, nn.Module):
        encoder.to(device)
    booster.to(device)

    stages = []
    if booster.denoiser is not None and train.denoiser_steps > 0:
        stages.append(("denoiser", train.denoiser_steps))
    if booster.mapper is not None and train.mapper_steps > 0:
        stages.append(("mapper", train.mapper_steps))
    total = sum(s for _, s in stages)

    checkpoint = Path(output_dir) / "checkpoint" if output_dir is not None else None
    resumed = load_checkpoint_state(checkpoint) if checkpoint is not None else None
    step, history, previous_seconds = 0, [], 0.0
    if resumed is not None:
        from .results import describe_changes

        saved = GaussianSmoothnessBooster.from_pretrained(resumed["path"], device=device)
        changed = describe_changes(saved.config.to_dict(), booster.config.to_dict())
        if changed:
            raise ValueError(f"checkpoint in {str(checkpoint)!r} was made for another GSBConfig ({'; '.join(changed)}); "
                             "use a new output_dir")
        changed = describe_changes(resumed["train_config"], train.to_dict()) if resumed.get("train_config") is not None else []
        if changed:
            raise ValueError(f"checkpoint in {str(checkpoint)!r} was made with other training settings ({'; '.join(changed)}); "
                             "rerun with the same settings to resume, or use a new output_dir")
        booster.load_state_dict(saved.state_dict())
        step, history = int(resumed["step"]), list(resumed["history"])
        previous_seconds = float(resumed.get("seconds", 0.0))
        accelerator.print(f"resuming from {resumed['path']} at step {step}/{total} (stage {resumed['stage']})")

    start = time.time()
    stage_start = 0
    pbar = tqdm(total=total, initial=step, disable=not (progress and accelerator.is_local_main_process), desc="gsb")
    for stage, stage_steps in stages:
        stage_end = stage_start + stage_steps
        if step >= stage_end:
            stage_start = stage_end
            continue
        module = booster.denoiser if stage == "denoiser" else booster.mapper
        other = booster.mapper if stage == "denoiser" else booster.denoiser
        if other is not None:
            other.requires_grad_(False)
        module.requires_grad_(True).train()
        lr = train.denoiser_lr if stage == "denoiser" else train.mapper_lr
        optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
        if resumed is not None and resumed["stage"] == stage and step > stage_start:
            optimizer.load_state_dict(unflatten_optimizer_state(resumed["optimizer_tensors"], resumed["optimizer"]))
        remaining = stage_end - step
        if isinstance(train_images, torch.utils.data.Dataset):
            dataset = train_images
        else:
            dataset = RandomCropDataset(
                train_images, train.image_size, length=remaining * train.batch_size * accelerator.num_processes,
                seed=train.seed, offset=step * train.batch_size * accelerator.num_processes,
            )
        loader = torch.utils.data.DataLoader(dataset, batch_size=train.batch_size, shuffle=False, drop_last=True)
        wrapped, optimizer, loader = accelerator.prepare(module, optimizer, loader)
        scheduler = lambda s: 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (s - stage_start) / max(1, stage_steps))))
        data_iter = iter(loader)
        cache = None
        if stage == "mapper" and train.mapper_cache_size > 0:
            cache = _build_feature_cache(booster, encoder, train_images, train, lo, hi, accelerator)
        while step < stage_end:
            for group in optimizer.param_groups:
                group["lr"] = scheduler(step)
            generator = seeded_generator(train.seed * 7_919 + step * 104_729 + accelerator.process_index, device)
            if cache is not None:
                pick = torch.randint(cache["z"].shape[0], (train.mapper_batch_size,), generator=generator, device=device)
                target, z, level, amplitude = (cache[k][pick] for k in ("target", "z", "level", "amplitude"))
            else:
                try:
                    clean = next(data_iter)
                except StopIteration:
                    data_iter = iter(loader)
                    clean = next(data_iter)
                noisy, sigma, amplitude = _sample_noise(clean, train, lo, hi, generator)
                level = booster.noise_level(noisy, sigma)  # what the stages are told at inference
            use_features = stage == "mapper" or (
                train.feature_weight > 0 and train.feature_every > 0 and (step + 1 - stage_start) % train.feature_every == 0)
            with accelerator.autocast():
                if cache is None and use_features:
                    with torch.no_grad():
                        target = encoder(clean)
                # per-sample weights: noise-free samples (amplitude 0) weigh clean_weight, noisy ones 1
                weight = torch.where(amplitude > 0, torch.ones_like(amplitude), torch.full_like(amplitude, train.clean_weight))
                if stage == "denoiser":
                    denoised = wrapped(noisy, level)
                    mse = ((denoised.float() - clean.float()) ** 2).flatten(1).mean(1) / sigma.pow(2)
                    loss = train.mse_weight * (weight * mse).mean()
                    parts = {"mse": float(mse.mean().detach())}
                    if use_features:
                        cons = 1 - flat_cosine(encoder(denoised), target)
                        loss = loss + train.feature_weight * (weight * cons).mean()
                        parts["consistency"] = float(cons.mean().detach())
                    if (amplitude == 0).any():
                        parts["mse_clean"] = float(mse[amplitude == 0].mean().detach())
                        if use_features:
                            parts["consistency_clean"] = float(cons[amplitude == 0].mean().detach())
                else:
                    if cache is None:
                        with torch.no_grad():
                            den = booster.denoiser(noisy, level) if booster.denoiser is not None else noisy
                            z = encoder(den)
                    mapped = wrapped(z, level)
                    cons = 1 - flat_cosine(mapped, target)
                    ident = identity_loss(accelerator.unwrap_model(wrapped), target) if train.identity_weight > 0 else torch.zeros((), device=device)
                    stats = stats_matching_loss(mapped[amplitude > 0] if (amplitude > 0).any() else mapped, target)
                    loss = train.consistency_weight * (weight * cons).mean() + train.identity_weight * ident + train.stats_weight * stats
                    parts = {"consistency": float(cons.mean().detach()), "identity": float(ident.detach()), "stats": float(stats.detach())}
                    if (amplitude == 0).any():
                        parts["consistency_clean"] = float(cons[amplitude == 0].mean().detach())
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if train.grad_clip > 0:
                accelerator.clip_grad_norm_(wrapped.parameters(), train.grad_clip)
            optimizer.step()
            step += 1
            record = {"step": step, "stage": stage, "loss": float(loss.detach()), **parts}
            if step % train.log_every == 0 or step == stage_end:
                history.append(record)
            pbar.update(1)
            pbar.set_postfix(stage=stage, **{k: f"{v:.4f}" for k, v in record.items() if k not in ("step", "stage")})
            if checkpoint is not None and (step % train.checkpoint_every == 0 or step == stage_end):
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # AcceleratedOptimizer
                    save_checkpoint(checkpoint, booster, inner, step, stage, history, previous_seconds + time.time() - start, train.to_dict())
        module.eval()
        stage_start = stage_end
    pbar.close()
    booster.eval()
    seconds = time.time() - start
    total_seconds = previous_seconds + seconds  # up to the last checkpoint of killed runs, plus this run
    if output_dir is not None and accelerator.is_main_process:
        booster.save_pretrained(Path(output_dir) / "final")
        (Path(output_dir) / "train_summary.json").write_text(json.dumps(
            {"step": step, "seconds_this_run": seconds, "seconds_total": total_seconds,
             "train_config": train.to_dict(), "history": history}, indent=1))
    return {"step": step, "history": history, "seconds": seconds, "seconds_total": total_seconds}


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def evaluate_certificates(
    encoder: Encoder,
    images: torch.Tensor,
    sigma: float,
    n: int = CertifyConfig.n,
    alpha: float = CertifyConfig.alpha,
    method: str = CertifyConfig.method,
    chunk_size: Optional[int] = None,
    seed: int = 0,
    reference: Optional[Encoder] = None,
) -> list[dict]:
    """Per image: S mean, S lower bound, certified FCSB(sigma/2), and cos(F_hat(x), g_ref(x)).

    One Monte-Carlo pass gives both the certificate (global mode, like ``certify_features``) and the
    smoothed direction F_hat, compared with the clean features of ``reference`` (default: ``encoder``).
    """
    from .certify import certificates_from_scores
    from .smoothing import check_images, monte_carlo_pass

    check_images(images)
    sigma = check_sigma(sigma)
    with torch.inference_mode():
        clean_unit, _ = unit_features(encoder(images), "global", batch_dims=1)
        ref_unit, _ = unit_features((reference or encoder)(images), "global", batch_dims=1)
        result = monte_carlo_pass(encoder, images, sigma, n, seed=seed, chunk_size=chunk_size, reference_unit=clean_unit)
        certs = certificates_from_scores(result.scores, alpha, sigma, method, "global")
        smooth_cos = flat_cosine(result.mean_unit, ref_unit)
        clean_cos = flat_cosine(clean_unit, ref_unit)
    return [
        {
            "score_mean": c.score_mean, "score_lower": c.score_lower, "fcsb_half_sigma": float(c.fcsb(sigma / 2)),
            "smoothed_cos_to_reference": float(sc), "clean_cos_to_reference": float(cc), "n": n, "alpha": alpha, "method": method,
        }
        for c, sc, cc in zip(certs, smooth_cos, clean_cos)
    ]


def build_encoder(name: str) -> tuple[PixelEncoder, str]:
    """The frozen encoder ([0,1] pixels -> patch tokens) and its id for the booster config."""
    if name == "dinov2":
        from .models import load_dinov2
        from .models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD

        return freeze(PixelEncoder(load_dinov2(), IMAGENET_MEAN, IMAGENET_STD, drop_tokens=1)), "dinov2-vits14-imgfocus/patch_tokens"
    from transformers import AutoImageProcessor, AutoModel

    from .hub.io import load_safetensors_model

    processor = AutoImageProcessor.from_pretrained(name)
    model = load_safetensors_model(AutoModel, name)  # never pickle weights
    return freeze(PixelEncoder(model, processor.image_mean, processor.image_std, drop_tokens=1)), f"{name}/patch_tokens"


# ------------------------------------------------------------------------------------------------
# a whole run (what fs-mllm train-gsb, fs_mllm/commands/train_gsb.py, parses its command line into)
# ------------------------------------------------------------------------------------------------
MIXED_PRECISION = ("no", "fp16", "bf16")
_TRAIN = GSBTrainConfig()  # the defaults a run shares with the training config and the booster's
_BOOSTER_FIELDS = {f.name: f.default for f in dataclasses.fields(GSBConfig) if f.default is not dataclasses.MISSING}


@dataclass
class BoosterTrainingRun:
    """One booster training run: the frozen encoder, the images, the booster's shape, both stages'
    training, where its checkpoints go and the held-out evaluation after it. Its defaults are the
    ``fs-mllm train-gsb`` defaults (the command reads them from here). Checked in full on construction
    (a ValueError naming the field) before any encoder loads.

    Data: ``images`` (a folder), ``dataset`` (a ``datasets`` image dataset), or neither: the offline
    photos ``TRAIN_PHOTOS``, evaluated on ``HELDOUT_PHOTOS``; with a folder or dataset its last
    ``heldout_fraction`` is held out. ``init_from`` fine-tunes a saved booster of the same shape.
    ``eval_n`` Monte-Carlo samples per held-out certificate at each of ``eval_sigmas`` (0: no evaluation).
    The training fields are :class:`GSBTrainConfig`'s (``size`` is its image_size).
    """

    output_dir: Union[str, os.PathLike]
    encoder: str = "dinov2"
    images: Optional[Union[str, os.PathLike]] = None
    dataset: Optional[str] = None
    split: str = "train"
    image_column: str = "image"
    heldout_fraction: float = 0.1
    size: int = _TRAIN.image_size
    # the command's own choices, where they differ from GSBConfig's and GSBTrainConfig's: the training noise
    # range, a longer mapper stage, a wider denoiser and more frequent checkpoints (the shipped DINOv2 booster's)
    sigma_min: float = 0.2
    sigma_max: float = 0.55
    mapper_steps: int = 300
    denoiser_channels: int = 48
    checkpoint_every: int = 25
    denoiser_steps: int = _TRAIN.denoiser_steps
    batch_size: int = _TRAIN.batch_size
    denoiser_lr: float = _TRAIN.denoiser_lr
    mapper_lr: float = _TRAIN.mapper_lr
    feature_weight: float = _TRAIN.feature_weight
    stats_weight: float = _TRAIN.stats_weight
    clean_fraction: float = _TRAIN.clean_fraction
    clean_weight: float = _TRAIN.clean_weight
    identity_weight: float = _TRAIN.identity_weight
    init_from: Optional[Union[str, os.PathLike]] = None
    feature_every: int = _TRAIN.feature_every
    mapper_cache_size: int = _TRAIN.mapper_cache_size
    mapper_batch_size: int = _TRAIN.mapper_batch_size
    denoiser_depth: int = _BOOSTER_FIELDS["denoiser_depth"]
    mapper_hidden: int = _BOOSTER_FIELDS["mapper_hidden"]
    use_denoiser: bool = True
    use_mapper: bool = True
    noise_level: str = _BOOSTER_FIELDS["noise_level"]
    mixed_precision: str = "no"
    seed: int = _TRAIN.seed
    save_to: Optional[Union[str, os.PathLike]] = None
    eval_n: int = 100
    eval_sigmas: Sequence[float] = (0.25, 0.5)

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir)
        for name in ("images", "init_from"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.fspath(value))
                if not os.path.isdir(getattr(self, name)):
                    raise ValueError(f"{name}: {getattr(self, name)!r} is not a folder")
        if self.images is not None and self.dataset is not None:
            raise ValueError("images and dataset are two sources of training images: give one")
        if isinstance(self.heldout_fraction, bool) or not 0 < float(self.heldout_fraction) < 1:
            raise ValueError(f"heldout_fraction must be a number in (0, 1), got {self.heldout_fraction!r}")
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be <= sigma_max ({self.sigma_max})")
        if self.noise_level not in NOISE_LEVELS:
            raise ValueError(f"noise_level must be one of {list(NOISE_LEVELS)}, got {self.noise_level!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if isinstance(self.eval_n, bool) or not isinstance(self.eval_n, int) or self.eval_n < 0 or self.eval_n == 1:
            raise ValueError(f"eval_n must be 0 (no evaluation) or an integer >= 2 (Monte-Carlo samples), got {self.eval_n!r}")
        self.eval_sigmas = tuple(check_sigma(sigma, "each of eval_sigmas") for sigma in self.eval_sigmas)
        self.train_config()  # the training fields, through GSBTrainConfig's own checks
        self.booster_config(feature_dim=1)  # and the booster's shape through GSBConfig's (the encoder sets feature_dim)

    def booster_config(self, feature_dim: int, encoder_id: str = "", extra: Optional[dict] = None) -> GSBConfig:
        return GSBConfig(
            feature_dim=feature_dim, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
            use_denoiser=self.use_denoiser, use_mapper=self.use_mapper, denoiser_channels=self.denoiser_channels,
            denoiser_depth=self.denoiser_depth, mapper_hidden=self.mapper_hidden, encoder_id=encoder_id,
            image_size=self.size, noise_level=self.noise_level, extra=dict(extra or {}),
        )

    def train_config(self) -> GSBTrainConfig:
        return GSBTrainConfig(
            denoiser_steps=self.denoiser_steps, mapper_steps=self.mapper_steps, batch_size=self.batch_size,
            denoiser_lr=self.denoiser_lr, mapper_lr=self.mapper_lr, feature_weight=self.feature_weight,
            stats_weight=self.stats_weight, clean_fraction=self.clean_fraction, clean_weight=self.clean_weight,
            identity_weight=self.identity_weight, image_size=self.size, seed=self.seed,
            feature_every=self.feature_every, mapper_cache_size=self.mapper_cache_size,
            mapper_batch_size=self.mapper_batch_size, checkpoint_every=self.checkpoint_every,
        )


def run_booster_training(run: BoosterTrainingRun) -> dict:
    """Train (resuming from ``run.output_dir/checkpoint`` when it holds one), save, and evaluate on the
    held-out images: the training result, with ``"heldout"`` the evaluation summary per sigma."""
    from accelerate import Accelerator

    from .gsb import boosted_encoder

    accelerator = Accelerator(mixed_precision=run.mixed_precision)
    encoder, encoder_id = build_encoder(run.encoder)
    if run.images or run.dataset:
        images = load_image_folder(run.images) if run.images else load_image_dataset(run.dataset, run.split, run.image_column)
        k = max(1, int(round(len(images) * run.heldout_fraction)))
        if len(images) <= k:
            raise ValueError(f"need more than {k} images to hold out {k}; got {len(images)}")
        train_images, held = images[:-k], torch.stack([resize_square(im, run.size) for im in images[-k:]])
        train_names, held_names = f"{len(train_images)} images of {run.images or run.dataset}", f"last {k}"
    else:
        train_images, held = [offline_photo(n) for n in TRAIN_PHOTOS], heldout_images(run.size)
        train_names, held_names = list(TRAIN_PHOTOS), list(HELDOUT_PHOTOS)

    with torch.no_grad():
        feature_dim = int(encoder(held[:1]).shape[-1])
    config = run.booster_config(feature_dim, encoder_id, {"train_images": train_names, "heldout_images": held_names})
    torch.manual_seed(run.seed)
    booster = GaussianSmoothnessBooster(config)
    if run.init_from:
        init = GaussianSmoothnessBooster.from_pretrained(run.init_from)
        arch = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("extra", "encoder_id", "image_size")}
        if arch(init.config) != arch(config):
            raise ValueError(f"init_from {run.init_from!r} has another architecture/sigma range: {arch(init.config)} vs {arch(config)}")
        booster.load_state_dict(init.state_dict())
        config.extra["init_from"] = str(run.init_from)
    train = run.train_config()
    out = Path(run.output_dir)
    start = time.time()
    result = train_gsb(booster, encoder, train_images, train, output_dir=out, accelerator=accelerator)
    elapsed = time.time() - start
    if accelerator.is_main_process:
        booster.config.extra.update({"train_steps": result["step"], "train_seconds": round(result["seconds_total"], 1),
                                     "train_device": str(accelerator.device), "num_processes": accelerator.num_processes,
                                     "train_config": train.to_dict()})
        if run.save_to:
            booster.save_pretrained(run.save_to)
        accelerator.print(f"trained {result['step']} steps in {elapsed:.0f}s this run ({result['seconds_total']:.0f}s total)")

    result["heldout"] = []
    if run.eval_n and accelerator.is_main_process:
        device = accelerator.device
        held = held.to(device)
        for sigma in run.eval_sigmas:
            before = evaluate_certificates(encoder, held, sigma, n=run.eval_n)
            after = evaluate_certificates(boosted_encoder(encoder, booster, sigma), held, sigma, n=run.eval_n, reference=encoder)
            mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
            summary = {
                "sigma": sigma, "n": run.eval_n,
                "S_before": mean(before, "score_mean"), "S_after": mean(after, "score_mean"),
                "fcsb_half_sigma_before": mean(before, "fcsb_half_sigma"), "fcsb_half_sigma_after": mean(after, "fcsb_half_sigma"),
                "clean_cos_boosted_vs_original": mean(after, "clean_cos_to_reference"),
            }
            accelerator.print(json.dumps(summary))
            (out / f"heldout_eval_sigma{sigma}.json").write_text(json.dumps({"summary": summary, "before": before, "after": after}, indent=1))
            result["heldout"].append(summary)
    return result

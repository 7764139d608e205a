"""One booster training run (what ``fs-mllm train-gsb``, fs_mllm/commands/train_gsb.py, parses its command line
into): the encoder and images chosen by name, both stages trained, the booster saved and evaluated held out."""


from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..config import check_sigma
from .data import HELDOUT_PHOTOS, TRAIN_PHOTOS, heldout_images, load_image_dataset, load_image_folder, offline_photo, resize_square
from .encoders import build_encoder
from .model import NOISE_LEVELS, GaussianSmoothnessBooster, GSBConfig, boosted_encoder
from .training import GSBTrainConfig, evaluate_certificates, train_gsb


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

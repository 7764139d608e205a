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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..config import CertifyConfig, check_seed, check_sigma
from ..smoothing import unit_features
from .checkpoint import load_checkpoint_state, save_checkpoint, unflatten_optimizer_state
from .data import RandomCropDataset, seeded_generator
from .encoders import freeze
from .losses import flat_cosine, identity_loss, stats_matching_loss
from .model import GaussianSmoothnessBooster

Encoder = Callable[[torch.Tensor], torch.Tensor]


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


def denoiser_loss(denoiser: nn.Module, encoder: Encoder, clean: torch.Tensor, noisy: torch.Tensor, level: torch.Tensor,
                  sigma: torch.Tensor, amplitude: torch.Tensor, weight: torch.Tensor, target: Optional[torch.Tensor],
                  train: GSBTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 1's loss on one batch: MSE to the clean image over sigma^2, plus (when ``target``, the clean features,
    is given: every ``feature_every``-th step) the consistency 1 - cos(f(D(x+e)), f(x)); and what it logs."""
    denoised = denoiser(noisy, level)
    mse = ((denoised.float() - clean.float()) ** 2).flatten(1).mean(1) / sigma.pow(2)
    loss = train.mse_weight * (weight * mse).mean()
    parts = {"mse": float(mse.mean().detach())}
    if target is not None:
        cons = 1 - flat_cosine(encoder(denoised), target)
        loss = loss + train.feature_weight * (weight * cons).mean()
        parts["consistency"] = float(cons.mean().detach())
    if (amplitude == 0).any():
        parts["mse_clean"] = float(mse[amplitude == 0].mean().detach())
        if target is not None:
            parts["consistency_clean"] = float(cons[amplitude == 0].mean().detach())
    return loss, parts


def mapper_loss(mapper: nn.Module, unwrapped_mapper: nn.Module, z: torch.Tensor, level: torch.Tensor, amplitude: torch.Tensor,
                weight: torch.Tensor, target: torch.Tensor, train: GSBTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 2's loss on one batch of (denoised) noisy features ``z``: consistency 1 - cos(M(z), f(x)), identity on
    the clean features and the statistics of the mapped noisy features matched to the clean ones; and what it logs."""
    mapped = mapper(z, level)
    cons = 1 - flat_cosine(mapped, target)
    ident = identity_loss(unwrapped_mapper, target) if train.identity_weight > 0 else torch.zeros((), device=z.device)
    stats = stats_matching_loss(mapped[amplitude > 0] if (amplitude > 0).any() else mapped, target)
    loss = train.consistency_weight * (weight * cons).mean() + train.identity_weight * ident + train.stats_weight * stats
    parts = {"consistency": float(cons.mean().detach()), "identity": float(ident.detach()), "stats": float(stats.detach())}
    if (amplitude == 0).any():
        parts["consistency_clean"] = float(cons[amplitude == 0].mean().detach())
    return loss, parts


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
        from ..results import describe_changes

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
                    loss, parts = denoiser_loss(wrapped, encoder, clean, noisy, level, sigma, amplitude, weight,
                                                target if use_features else None, train)
                else:
                    if cache is None:
                        with torch.no_grad():
                            den = booster.denoiser(noisy, level) if booster.denoiser is not None else noisy
                            z = encoder(den)
                    loss, parts = mapper_loss(wrapped, accelerator.unwrap_model(wrapped), z, level, amplitude, weight, target,
                                              train)
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
    from ..certify import certificates_from_scores
    from ..smoothing import check_images, monte_carlo_pass

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

"""The smoothed feature path: one call of the model's image-feature function -> per-image noisy-copy encoders.

Generate (the patched function), certification (``certify_model``), attacks (through the patched
function) and booster evaluation all go through :func:`encoded_groups`, so grouping images by shape,
slicing the per-image kwargs and applying the booster (denoiser before the original feature function,
mapper after it, both told the measured noise level) live in one place, and what is certified is
exactly what is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from .adapters.base import FamilyAdapter, per_row_level
from .config import FSConfig
from .smoothing import Encoder, rescale_direction, smoothed_mean

__all__ = ["BoosterStages", "FSState", "booster_stage", "encoded_groups", "make_group_encoder", "smoothed_image_features"]


@dataclass
class FSState:
    """Everything a patched model needs at call time (kept as a plain object, so no submodule is added)."""

    config: FSConfig
    adapter: FamilyAdapter
    image_mean: torch.Tensor  # (3,) float32
    image_std: torch.Tensor  # (3,) float32
    booster: Any = None
    # function name -> (the owner had an instance attribute of that name, its value): what unpatch restores
    saved: dict = field(default_factory=dict)
    video_depth: int = 0  # > 0 while the owner's video-feature function runs (its image calls are video frames)


def booster_stage(booster: Any, name: str) -> Optional[Callable]:
    fn = getattr(booster, name, None) if booster is not None else None
    return fn if callable(fn) else None


class BoosterStages:
    """The booster protocol's stages around an encoder, each optional (absent = skipped; an absent
    ``noise_level`` means the stages are told sigma). The one place that applies a booster: the
    patched path and :func:`fs_mllm.booster.model.boosted_encoder` both go through it."""

    def __init__(self, booster: Any, sigma: float) -> None:
        self.sigma = sigma
        self.denoise = booster_stage(booster, "denoise")
        self.map_features = booster_stage(booster, "map_features")
        self.noise_level = booster_stage(booster, "noise_level")

    @property
    def reads_pixels(self) -> bool:
        """Whether the stages need the [0,1] pixels (else the encoder's input passes through untouched)."""
        return self.denoise is not None or self.noise_level is not None

    def level(self, pixels01: torch.Tensor) -> Any:
        return self.noise_level(pixels01, self.sigma) if self.noise_level is not None else self.sigma

    def before(self, pixels01: torch.Tensor, level: Any) -> torch.Tensor:
        return self.denoise(pixels01, level) if self.denoise is not None else pixels01

    def after(self, features: torch.Tensor, level: Any) -> torch.Tensor:
        if self.map_features is None:
            return features
        return self.map_features(features, per_row_level(level, features.shape[0]))


def make_group_encoder(
    model: nn.Module,
    adapter: FamilyAdapter,
    original: Callable,
    extra: Mapping[str, torch.Tensor],
    call_kwargs: Mapping[str, Any],
    state: FSState,
    template: Optional[list] = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """encode(images (k*B, ..., 3, H, W) normalised) -> features (k*B, T, D) of the base (boosted) encoder.

    Applies the booster's stages (:class:`BoosterStages`) on [0,1] pixels before the original feature
    function and on the features after it. ``template`` (a list) receives the last raw output, so the
    caller can rebuild an output of the same type.
    """
    stages = BoosterStages(state.booster, state.config.sigma)

    def encode(images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        level: Any = stages.sigma
        if stages.reads_pixels:
            pixels = adapter.denormalise(images.float(), state.image_mean, state.image_std)
            flat = pixels.reshape((-1,) + tuple(pixels.shape[-3:]))
            level = stages.level(flat)
            if stages.denoise is not None:
                flat = stages.before(flat, level)
                images = adapter.normalise(flat.reshape(pixels.shape).float(), state.image_mean, state.image_std).to(images.dtype)
        repeats = {}
        for key, rows in extra.items():
            times = count // rows.shape[0]
            repeats[key] = rows.repeat((times,) + (1,) * (rows.ndim - 1))
        pixel_values, kwargs = adapter.inputs_from_images(model, images, repeats)
        output = original(pixel_values=pixel_values, **{**call_kwargs, **kwargs, "return_dict": True})
        if template is not None:
            template[:] = [output]
        return stages.after(adapter.call_features(output, count, kwargs), level)

    return encode


def encoded_groups(model: nn.Module, original: Callable, state: FSState, pixel_values: torch.Tensor,
                   kwargs: Mapping[str, Any], template: Optional[list] = None) -> Iterator[tuple[list[int], torch.Tensor, Encoder]]:
    """(positions in the call, stacked normalised images, their base (boosted) encoder) per same-shape group."""
    adapter = state.adapter
    call_kwargs = {k: v for k, v in kwargs.items() if k not in adapter.per_image_kwargs}
    for group in adapter.group_images(model, pixel_values, dict(kwargs)):
        x, extra = group.stacked()
        yield group.indices, x, make_group_encoder(model, adapter, original, extra, call_kwargs, state, template)


def smoothed_image_features(model: nn.Module, original: Callable, state: FSState, pixel_values: torch.Tensor,
                            kwargs: Mapping[str, Any]) -> tuple[list[torch.Tensor], Any]:
    """Per-image smoothed features in call order, and the last raw output (the type to rebuild)."""
    config = state.config
    noise_std = state.adapter.noise_std(config.sigma, state.image_std)
    template: list = []
    per_image: dict[int, torch.Tensor] = {}
    for indices, x, encode in encoded_groups(model, original, state, pixel_values, kwargs, template):
        mean = smoothed_mean(encode, x, noise_std, config.n_samples,
                             seed=config.seed, chunk_size=config.chunk_size, normalize=config.normalize)
        smoothed = rescale_direction(mean.mean_unit, mean.mean_norm, config.normalize).to(mean.dtype)
        for index, features in zip(indices, smoothed):
            per_image[index] = features
    return [per_image[i] for i in range(len(per_image))], template[0]

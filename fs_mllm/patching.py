"""patch_model: make any supported Hugging Face multimodal LLM use feature-space smoothed image features.

The patch wraps the model's image-feature function (``get_image_features`` on the inner model, the one
``generate()`` calls before prefill) on the instance, so ``forward``/``generate`` are untouched, the vision
path runs once per prefill with ``n_samples`` noisy copies, and ``unpatch_model`` restores the original
bound method exactly. Noise is added in the normalised pixel space with per-channel std sigma / std_c
(= std sigma in [0,1] pixel space), drawn in float32 from a seeded generator.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import adapters as _adapters  # noqa: F401  (registers every family)
from .adapters.base import FamilyAdapter, get_adapter, per_row_level, unwrap_model
from .certify import Certificate, certificates_from_scores, sample_scores
from .config import FSConfig, check_n, check_sigma
from .smoothing import check_images, rescale_direction, smoothed_mean

_STATE_ATTR = "fs_state"


@dataclass
class FSState:
    """Everything a patched model needs at call time (kept as a plain object, so no submodule is added)."""

    config: FSConfig
    adapter: FamilyAdapter
    image_mean: torch.Tensor  # (3,) float32
    image_std: torch.Tensor  # (3,) float32
    booster: Any = None
    owner_had_instance_attr: bool = False
    previous_instance_attr: Any = None


# ---------------------------------------------------------------------------------------------
# mean/std resolution
# ---------------------------------------------------------------------------------------------

def _as_channels(values: Any, name: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of per-channel floats, got {values!r}") from None
    if tensor.numel() == 1:
        tensor = tensor.repeat(3)
    if tensor.numel() != 3 or not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must hold 3 finite per-channel values (RGB), got {values!r}")
    return tensor


def _mean_std_from_processor(processor: Any) -> Optional[tuple[Any, Any]]:
    image_processor = getattr(processor, "image_processor", processor)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        return None
    return mean, std


def _mean_std_from_saved_config(name_or_path: str) -> Optional[tuple[Any, Any]]:
    """Read image_mean/std saved with the model: local folder, then the HF cache (offline only)."""
    if not name_or_path:
        return None
    candidates = []
    for filename in ("preprocessor_config.json", "processor_config.json"):
        if os.path.isdir(name_or_path):
            candidates.append(os.path.join(name_or_path, filename))
            continue
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, filename)
            if isinstance(cached, str):
                candidates.append(cached)
        except Exception:  # noqa: BLE001 - not a repo id / no cache: fall through to the family default
            pass
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            data = data.get("image_processor", data)
            if data.get("image_mean") is not None and data.get("image_std") is not None:
                return data["image_mean"], data["image_std"]
    return None


def resolve_mean_std(
    model: nn.Module, adapter: FamilyAdapter, processor: Any = None, image_mean: Any = None, image_std: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Processor mean/std: explicit > processor= > saved preprocessor_config.json > family default (warned)."""
    if (image_mean is None) != (image_std is None):
        given = "image_mean" if image_mean is not None else "image_std"
        raise ValueError(f"image_mean and image_std must be given together (the processor's per-channel normalisation); "
                         f"only {given} was given")
    if image_mean is not None:
        return _as_channels(image_mean, "image_mean"), _as_channels(image_std, "image_std")
    if processor is not None:
        found = _mean_std_from_processor(processor)
        if found is None:
            raise ValueError("processor has no image_mean/image_std; pass an image processor or image_mean=/image_std=")
        return _as_channels(found[0], "processor.image_mean"), _as_channels(found[1], "processor.image_std")
    hf_model = unwrap_model(model)
    source = getattr(hf_model, "name_or_path", "") or getattr(getattr(hf_model, "config", None), "name_or_path", "") or ""
    found = _mean_std_from_saved_config(source)
    if found is not None:
        return _as_channels(found[0], "image_mean"), _as_channels(found[1], "image_std")
    mean, std = adapter.default_image_mean, adapter.default_image_std
    warnings.warn(
        f"fs_mllm.patch_model: no processor=, image_mean=/image_std= or saved preprocessor_config.json found; "
        f"using the {adapter.name} family default image_mean={list(mean)}, image_std={list(std)}. "
        "Noise std per channel is sigma / image_std, so pass processor= if your checkpoint differs.",
        UserWarning,
        stacklevel=3,
    )
    return _as_channels(mean, "image_mean"), _as_channels(std, "image_std")


# ---------------------------------------------------------------------------------------------
# the smoothed feature path
# ---------------------------------------------------------------------------------------------

def _booster_stage(booster: Any, name: str) -> Optional[Callable]:
    fn = getattr(booster, name, None) if booster is not None else None
    return fn if callable(fn) else None


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

    Applies the booster's denoiser on [0,1] pixels before the original feature function and its
    mapper on the features after it. ``template`` (a list) receives the last raw output, so the
    caller can rebuild an output of the same type.
    """
    denoise = _booster_stage(state.booster, "denoise")
    map_features = _booster_stage(state.booster, "map_features")
    noise_level = _booster_stage(state.booster, "noise_level")  # optional: absent means told sigma
    sigma = state.config.sigma

    def encode(images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        level: Any = sigma
        if denoise is not None or noise_level is not None:
            pixels = adapter.denormalise(images.float(), state.image_mean, state.image_std)
            flat = pixels.reshape((-1,) + tuple(pixels.shape[-3:]))
            if noise_level is not None:
                level = noise_level(flat, sigma)
        if denoise is not None:
            flat = denoise(flat, level)
            images = adapter.normalise(flat.reshape(pixels.shape).float(), state.image_mean, state.image_std).to(images.dtype)
        repeats = {}
        for key, rows in extra.items():
            times = count // rows.shape[0]
            repeats[key] = rows.repeat((times,) + (1,) * (rows.ndim - 1))
        pixel_values, kwargs = adapter.inputs_from_images(model, images, repeats)
        output = original(pixel_values=pixel_values, **{**call_kwargs, **kwargs, "return_dict": True})
        if template is not None:
            template[:] = [output]
        features = adapter.extract_features(output, count)
        if map_features is not None:
            features = map_features(features, per_row_level(level, count))
        return features

    return encode


def _smoothed_call(model: nn.Module, original: Callable, state: FSState, args: tuple, kwargs: dict) -> Any:
    """The body of the patched get_image_features: smooth each image group, rebuild the output."""
    if args:  # e.g. PaliGemma's outer get_image_features passes pixel_values positionally
        kwargs = {**_bind_positional(original, args), **kwargs}
    pixel_values = kwargs.pop("pixel_values", None)
    if pixel_values is None:
        return original(**kwargs)
    return_dict = kwargs.pop("return_dict", True)
    adapter = state.adapter
    config = state.config
    groups = adapter.group_images(model, pixel_values, kwargs)
    call_kwargs = {k: v for k, v in kwargs.items() if k not in adapter.per_image_kwargs}
    noise_std = adapter.noise_std(config.sigma, state.image_std)
    per_image: list[Optional[torch.Tensor]] = [None] * sum(len(g.indices) for g in groups)
    template: list = []
    for group in groups:
        x, extra = group.stacked()
        encode = make_group_encoder(model, adapter, original, extra, call_kwargs, state, template)
        mean = smoothed_mean(
            encode, x, noise_std, config.n_samples,
            seed=config.seed, chunk_size=config.chunk_size, normalize=config.normalize,
        )
        smoothed = rescale_direction(mean.mean_unit, mean.mean_norm, config.normalize).to(mean.dtype)
        for index, features in zip(group.indices, smoothed):
            per_image[index] = features
    raw = template[0]
    pooled = raw.pooler_output if hasattr(raw, "pooler_output") else None
    if isinstance(pooled, torch.Tensor):
        new_pooled: Any = torch.stack(per_image)
    elif isinstance(pooled, tuple):
        new_pooled = tuple(per_image)
    else:
        new_pooled = list(per_image)
    output = type(raw)(pooler_output=new_pooled) if hasattr(raw, "pooler_output") else (None, new_pooled)
    if return_dict is False and hasattr(output, "to_tuple"):
        return output.to_tuple()
    return output


def _bind_positional(fn: Callable, args: tuple) -> dict:
    """Positional arguments of a call to ``fn`` as keyword arguments (names from its signature)."""
    import inspect

    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise ValueError(f"too many positional arguments for {getattr(fn, '__name__', 'get_image_features')}: {len(args)}")
    return dict(zip(names, args))


class SmoothedFeatureFunction:
    """The patched image-feature function, installed on the owner instance in place of the original.

    A callable object rather than a closure, so that ``copy.deepcopy(model)`` copies it with the model:
    its ``model`` and ``__wrapped__`` (the original bound method) are rebound to the copy, and the copy's
    patch runs the copy's weights. ``functools.update_wrapper`` keeps the original signature, which
    ``generate()`` inspects.
    """

    def __init__(self, model: nn.Module, original: Callable) -> None:
        functools.update_wrapper(self, original)
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state: FSState = self.model.__dict__[_STATE_ATTR]
        return _smoothed_call(self.model, self.__wrapped__, state, args, kwargs)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or the transformers model under its PEFT wrapper) carries the fs_mllm patch."""
    hf_model = unwrap_model(model)
    state = hf_model.__dict__.get(_STATE_ATTR)
    if state is None:
        return False
    owner = state.adapter.feature_owner(hf_model)
    return isinstance(owner.__dict__.get(state.adapter.feature_function), SmoothedFeatureFunction)


def get_fs_state(model: nn.Module) -> FSState:
    """The FSState of a patched model (config, adapter, mean/std, booster); ValueError if unpatched."""
    if not is_patched(model):
        raise ValueError("model is not patched; call fs_mllm.patch_model(model, sigma=...) first")
    return unwrap_model(model).__dict__[_STATE_ATTR]


def patch_model(
    model: nn.Module,
    sigma: Union[float, str, os.PathLike] = 0.25,
    n_samples: int = 8,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    normalize: str = "global",
    booster: Any = None,
    config: Optional[FSConfig] = None,
    processor: Any = None,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
) -> nn.Module:
    """Swap the model's image features for feature-space smoothed ones, in place; returns ``model``.

    ``config`` (an FSConfig) overrides sigma/n_samples/seed/chunk_size/normalize when given. Patching
    an already patched model re-configures it (never wraps twice). mean/std come from ``image_mean``/
    ``image_std``, else ``processor``, else the saved preprocessor config, else the family default
    (with a warning). ``booster`` follows fs_mllm.adapters.base.Booster.

    ``sigma`` may instead name a folder or Hub repo id saved by ``fs_mllm.save_pretrained``: the
    settings, mean/std and booster then all come from its fs_config.json (the other arguments must
    keep their defaults), and the model's family must match the saved one.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers multimodal model), got {type(model).__name__}")
    if isinstance(sigma, (str, os.PathLike)):
        changed = {"n_samples": n_samples != 8, "seed": seed != 0, "normalize": normalize != "global"}
        changed.update((name, value is not None) for name, value in (
            ("chunk_size", chunk_size), ("booster", booster), ("config", config), ("processor", processor),
            ("image_mean", image_mean), ("image_std", image_std)))
        given = [name for name, is_given in changed.items() if is_given]
        if given:
            raise ValueError(f"patch_model(model, {os.fspath(sigma)!r}) takes every setting from the saved fs_config.json; "
                             f"drop {given}, or patch with sigma=<number> and your own settings")
        from .hub import patch_from_saved

        return patch_from_saved(model, sigma)
    if config is None:
        config = FSConfig(sigma=sigma, n_samples=n_samples, seed=seed, chunk_size=chunk_size, normalize=normalize)
    elif not isinstance(config, FSConfig):
        raise ValueError(f"config must be an fs_mllm.FSConfig or None, got {type(config).__name__}")
    adapter = get_adapter(model)
    hf_model = unwrap_model(model)
    mean, std = resolve_mean_std(model, adapter, processor, image_mean, image_std)
    if (std <= 0).any():
        raise ValueError(f"image_std must be positive per channel, got {std.tolist()}")
    if booster is not None:
        check = getattr(booster, "check_compatible", None)
        if not callable(check):
            raise ValueError("booster must implement check_compatible(feature_dim, sigma) (see fs_mllm.adapters.base.Booster)")
        if _booster_stage(booster, "denoise") is None and _booster_stage(booster, "map_features") is None:
            raise ValueError("booster has neither denoise(pixels01, sigma) nor map_features(features, sigma)")
        check(adapter.feature_dim(model), config.sigma)
    owner = adapter.feature_owner(hf_model)
    if is_patched(hf_model):
        state: FSState = hf_model.__dict__[_STATE_ATTR]
        state.config, state.image_mean, state.image_std, state.booster = config, mean, std, booster
    else:
        name = adapter.feature_function
        had = name in owner.__dict__
        previous = owner.__dict__.get(name)
        original = getattr(owner, name)
        state = FSState(config, adapter, mean, std, booster, had, previous)
        hf_model.__dict__[_STATE_ATTR] = state
        setattr(owner, name, SmoothedFeatureFunction(hf_model, original))
    hf_model.__dict__["fs_config"] = config
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove the patch: the original image-feature function comes back exactly; returns ``model``."""
    hf_model = unwrap_model(model)
    if not is_patched(hf_model):
        return model
    state: FSState = hf_model.__dict__[_STATE_ATTR]
    owner = state.adapter.feature_owner(hf_model)
    name = state.adapter.feature_function
    if state.owner_had_instance_attr:
        owner.__dict__[name] = state.previous_instance_attr
    else:
        del owner.__dict__[name]
    del hf_model.__dict__[_STATE_ATTR]
    hf_model.__dict__.pop("fs_config", None)
    return model


@dataclass
class ModelCertificate(Certificate):
    """A Certificate plus, when ``certify_model(radius=...)`` was given, the bound at that radius."""

    radius_checked: Optional[float] = None
    bound: Optional[float] = None


def _original_feature_function(model: nn.Module, adapter: FamilyAdapter) -> Callable:
    owner = adapter.feature_owner(model)
    current = getattr(owner, adapter.feature_function)
    return current.__wrapped__ if isinstance(current, SmoothedFeatureFunction) else current


def certify_model(
    model: nn.Module,
    images_or_pixel_values: Union[torch.Tensor, Mapping[str, Any]],
    radius: Optional[float] = None,
    n: int = 1000,
    alpha: Optional[float] = None,
    method: Optional[str] = None,
    sigma: Optional[float] = None,
    normalize: Optional[str] = None,
    seed: Optional[int] = None,
    chunk_size: Optional[int] = None,
    processor: Any = None,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    **model_inputs: Any,
) -> list[ModelCertificate]:
    """Certify the smoothed features that feed the language decoder, one certificate per image.

    ``images_or_pixel_values``: [0,1] images (B, 3, H, W) at processor resolution (converted with the
    adapter; family kwargs such as ``image_sizes`` may be passed as keywords), or processor outputs (a
    dict with ``pixel_values`` and the family kwargs). For a patched model sigma, normalize, seed,
    chunk_size, alpha, method, mean/std and booster come from the patch's FSConfig unless given (a
    differing sigma is an error); for an unpatched model ``sigma`` is required and the rest default to
    FSConfig's defaults. image_mean and image_std go together. The certificate is about the exact
    smoothed (boosted) encoder F and holds per image with probability >= 1 - alpha; with ``radius``
    each result also carries FCSB(radius).
    """
    hf_model = unwrap_model(model)
    adapter = get_adapter(hf_model)
    check_n(n)
    if radius is not None:
        radius = _check_radius(radius)
    # None = the patch's value (an unpatched model: FSConfig's default); explicit arguments win
    overrides = {k: v for k, v in (("normalize", normalize), ("seed", seed), ("chunk_size", chunk_size),
                                   ("alpha", alpha), ("method", method)) if v is not None}
    explicit_mean_std = image_mean is not None or image_std is not None or processor is not None
    if is_patched(hf_model):
        state = get_fs_state(hf_model)
        if sigma is not None and check_sigma(sigma) != state.config.sigma:
            raise ValueError(f"sigma={sigma} differs from the patch's sigma={state.config.sigma}; omit sigma or re-patch")
        config = state.config.replace(**overrides)
        if explicit_mean_std:
            mean, std = resolve_mean_std(hf_model, adapter, processor, image_mean, image_std)
        else:
            mean, std = state.image_mean, state.image_std
        state = FSState(config, adapter, mean, std, state.booster)
    else:
        if sigma is None:
            raise ValueError("sigma is required to certify an unpatched model (or patch it first with patch_model)")
        config = FSConfig(sigma=sigma, **overrides)
        mean, std = resolve_mean_std(hf_model, adapter, processor, image_mean, image_std)
        state = FSState(config, adapter, mean, std, None)

    if isinstance(images_or_pixel_values, torch.Tensor):
        check_images(images_or_pixel_values, "images_or_pixel_values")
        inputs = adapter.pixels_to_model_inputs(hf_model, images_or_pixel_values, state.image_mean, state.image_std, **model_inputs)
    elif isinstance(images_or_pixel_values, Mapping) and "pixel_values" in images_or_pixel_values:
        check_images(images_or_pixel_values["pixel_values"], "images_or_pixel_values['pixel_values']", unit_range=False)
        inputs = {**dict(images_or_pixel_values), **model_inputs}
    else:
        raise ValueError(
            "images_or_pixel_values must be [0,1] images (B, 3, H, W) or processor outputs (a dict with pixel_values)"
        )
    signature_keys = set(_signature_params(_original_feature_function(hf_model, adapter)))
    pixel_values = inputs.pop("pixel_values")
    kwargs = {k: v for k, v in inputs.items() if k in signature_keys}
    device = _input_device(hf_model, pixel_values)
    pixel_values = pixel_values.to(device)
    original = _original_feature_function(hf_model, adapter)
    groups = adapter.group_images(hf_model, pixel_values, kwargs)
    call_kwargs = {k: v for k, v in kwargs.items() if k not in adapter.per_image_kwargs}
    noise_std = adapter.noise_std(config.sigma, state.image_std)
    results: list[Optional[ModelCertificate]] = [None] * sum(len(g.indices) for g in groups)
    for group in groups:
        x, extra = group.stacked()
        encode = make_group_encoder(hf_model, adapter, original, extra, call_kwargs, state)
        scores = sample_scores(encode, x, noise_std, n, seed=config.seed, chunk_size=config.chunk_size, normalize=config.normalize)
        for index, cert in zip(group.indices, certificates_from_scores(scores, config.alpha, config.sigma, config.method, config.normalize)):
            bound = None if radius is None else float(cert.fcsb(radius))
            results[index] = ModelCertificate(**cert.__dict__, radius_checked=radius, bound=bound)
    return results


def _check_radius(radius: Any) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be None or a finite, non-negative l2 radius in [0,1] pixel space, got {radius!r}")
    return float(radius)


def _signature_params(fn: Callable) -> list[str]:
    import inspect

    return [p for p in inspect.signature(fn).parameters if p != "kwargs"]


def _input_device(model: nn.Module, pixel_values: torch.Tensor) -> torch.device:
    """Certification inputs go where the model's first parameter lives (accelerate hooks move them on)."""
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return pixel_values.device

"""patch_model: make any supported Hugging Face multimodal LLM use feature-space smoothed image features.

This module owns patch / unpatch / the patch's state; the smoothed path it runs is
:mod:`fs_mllm.smoothed_path`, mean/std resolution :mod:`fs_mllm.normalization`, and certification of a
patched model :func:`fs_mllm.certify.certify_model`.

The patch wraps the model's image-feature function (``get_image_features`` on the inner model, the one
``generate()`` calls before prefill) on the instance, so ``forward``/``generate`` are untouched, the vision
path runs once per prefill with ``n_samples`` noisy copies, and ``unpatch_model`` restores the original
bound method exactly. Noise is added in the normalised pixel space with per-channel std sigma / std_c
(= std sigma in [0,1] pixel space), drawn in float32 from each image's own stream (seeded from the
config seed and the image, see :func:`fs_mllm.smoothing.image_noise_seed`), so results are batch-invariant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from torch import nn

from . import adapters as _adapters  # noqa: F401  (registers every family)
from .adapters.base import FamilyAdapter, get_adapter, unwrap_model
from .compat import check_transformers_version
from .config import FSConfig
from .normalization import resolve_mean_std
from .smoothed_path import FSState, booster_stage, smoothed_image_features

_STATE_ATTR = "fs_state"


# ---------------------------------------------------------------------------------------------
# the patch body
# ---------------------------------------------------------------------------------------------

def _smoothed_call(model: nn.Module, original: Callable, state: FSState, args: tuple, kwargs: dict) -> Any:
    """The body of the patched get_image_features: smooth each image, rebuild the family's output.

    Pixels may arrive under an alias (``adapter.pixel_aliases``); calls made from inside the video-feature
    function are video frames and pass through unsmoothed unless ``FSConfig.smooth_video``.
    """
    if args:  # e.g. PaliGemma's outer get_image_features passes pixel_values positionally
        kwargs = {**_bind_positional(original, args), **kwargs}
    adapter = state.adapter
    key = next((k for k in ("pixel_values",) + adapter.pixel_aliases if kwargs.get(k) is not None), None)
    if key is None or (state.video_depth > 0 and not state.config.smooth_video):
        return original(**kwargs)
    pixel_values = kwargs[key]
    for name in ("pixel_values",) + adapter.pixel_aliases:
        kwargs.pop(name, None)
    return_dict = kwargs.pop("return_dict", True)
    per_image, raw = smoothed_image_features(model, original, state, pixel_values, kwargs)
    return adapter.rebuild_output(raw, per_image, return_dict, {"pixel_values": pixel_values, **kwargs})


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


class VideoScope:
    """The owner's video-feature function, wrapped so the image function knows its calls are video frames.

    Families such as Qwen3-VL / Qwen3.5 / Kimi-K2.5 encode videos by calling ``get_image_features``
    from ``get_video_features``; without this marker the frames would be taken for images (and a
    frame layout the image path does not expect would crash). Deep-copies like SmoothedFeatureFunction.
    """

    def __init__(self, model: nn.Module, original: Callable) -> None:
        functools.update_wrapper(self, original)
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state: FSState = self.model.__dict__[_STATE_ATTR]
        state.video_depth += 1
        try:
            return self.__wrapped__(*args, **kwargs)
        finally:
            state.video_depth -= 1


def _install(owner: nn.Module, name: str, wrapper_cls: type, hf_model: nn.Module, state: FSState) -> None:
    """Wrap ``owner.<name>`` on the instance, remembering what to restore."""
    state.saved[name] = (name in owner.__dict__, owner.__dict__.get(name))
    setattr(owner, name, wrapper_cls(hf_model, getattr(owner, name)))


_CLOSED = "__fs_mllm_closed__"  # on a replacement whose block closed while a later one was in place: (had, previous)


@contextlib.contextmanager
def replaced_feature_function(model: nn.Module, adapter: FamilyAdapter,
                              make: Callable[[Callable], Callable]) -> Iterator[Callable]:
    """Within the block the image-feature function is ``make(current function)`` on the owner instance (recording
    its calls, or running the base function h's path); what was there comes back afterwards, also on error.

    A block that closes while one opened inside it is still in place (generators closed out of order) leaves that
    one alone and marks its own function closed; whoever later restores it (the inner block, or unpatch_model)
    restores what was there before instead. Not thread-safe: the function is an attribute of the model, which
    every thread shares.
    """
    owner = adapter.feature_owner(unwrap_model(model))
    name = adapter.feature_function
    had, previous = name in owner.__dict__, owner.__dict__.get(name)
    replacement = make(getattr(owner, name))
    owner.__dict__[name] = replacement
    try:
        yield replacement
    finally:
        if owner.__dict__.get(name) is not replacement:
            setattr(replacement, _CLOSED, (had, previous))
        else:
            _restore(owner, name, had, previous)


def _restore(owner: nn.Module, name: str, had: bool, previous: Any) -> None:
    """Put ``previous`` back as ``owner.<name>`` (or remove the instance attribute), skipping functions of blocks
    that have closed."""
    while had and hasattr(previous, _CLOSED):
        had, previous = getattr(previous, _CLOSED)
    if had:
        owner.__dict__[name] = previous
    else:
        owner.__dict__.pop(name, None)


def _smoothed_function(function: Any) -> Optional["SmoothedFeatureFunction"]:
    """The SmoothedFeatureFunction under ``function``'s wrappers (a recorder's ``__wrapped__`` chain), or None."""
    for _ in range(8):  # a bounded walk: wrappers here nest at most a few deep
        if isinstance(function, SmoothedFeatureFunction):
            return function
        function = getattr(function, "__wrapped__", None)
        if function is None:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` carries the fs_mllm patch (see ``patch_model``).

    Args:
        model: a transformers model, or a PEFT wrapper of one (the model under it is checked).

    Returns:
        True when its image-feature function is the smoothed one.

    Raises:
        ValueError: ``model`` is not a torch.nn.Module.
    """
    hf_model = unwrap_model(model)
    state = hf_model.__dict__.get(_STATE_ATTR)
    if state is None:
        return False
    owner = state.adapter.feature_owner(hf_model)
    return _smoothed_function(owner.__dict__.get(state.adapter.feature_function)) is not None


def get_fs_state(model: nn.Module) -> FSState:
    """The state of a patched model's smoothing, which the patch reads at every call.

    To change the settings, call ``patch_model`` again (it re-checks the booster).

    Args:
        model: a patched model, or a PEFT wrapper of one.

    Returns:
        Its ``FSState``: ``config`` (the FSConfig), ``adapter`` (the family adapter), ``image_mean`` and
        ``image_std`` (the processor's per-channel normalisation, float32 tensors of shape (3,), through
        which sigma in [0,1] pixel space becomes sigma / std_c in the normalised space) and ``booster``
        (or None).

    Raises:
        ValueError: the model is not patched, or not a torch.nn.Module.
    """
    if not is_patched(model):
        raise ValueError("model is not patched; call fs_mllm.patch_model(model, sigma=...) first")
    return unwrap_model(model).__dict__[_STATE_ATTR]


@contextlib.contextmanager
def config_override(model: nn.Module, **changes: Any) -> Iterator[FSConfig]:
    """Within the block the patch smooths with these FSConfig changes (e.g. a fresh noise seed per EOT
    forward of an attack, more copies while certifying a gradient); the patch's config comes back
    afterwards, also on error. The patch reads its config at every call, so nothing else is touched."""
    state = get_fs_state(model)
    previous = state.config
    state.config = previous.replace(**changes)
    try:
        yield state.config
    finally:
        state.config = previous


def patch_model(
    model: nn.Module,
    config: Union[FSConfig, str, os.PathLike, None] = None,
    *,
    booster: Any = None,
    processor: Any = None,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    **overrides: Any,
) -> nn.Module:
    """Swap the model's image features for feature-space smoothed ones, in place.

    The model's image-feature function (``get_image_features`` on the inner model, the one ``generate()``
    calls before prefill) is wrapped on the instance: each image is replaced by ``n_samples`` Gaussian
    copies (std sigma in [0,1] pixel space, i.e. sigma / std_c per channel in the processor's normalised
    space), optionally denoised and mapped by ``booster``, and the decoder receives the direction of the
    mean of their unit features at the features' scale. ``forward`` and ``generate`` are untouched, the
    vision path runs once per prefill, and ``unpatch_model`` restores the original exactly. Patching
    a patched model re-configures it (it never wraps twice). mean/std come from ``image_mean``/``image_std``,
    else ``processor``, else the preprocessor config saved with the model, else the family default (with
    a warning naming the values).

    Args:
        model: a transformers multimodal model of a supported family (see the Patching page), or a PEFT
            wrapper of one.
        config: an FSConfig (default ``FSConfig()``). A folder / Hub repo id written by
            ``fs_mllm.save_pretrained`` is refused with the call that applies it,
            ``fs_mllm.patch_from_saved(model, folder)`` (as PEFT's ``get_peft_model`` takes a config and
            ``PeftModel.from_pretrained`` a folder).
        booster: None, or an object following the booster protocol (``check_compatible(feature_dim,
            sigma)`` and ``denoise(pixels01, sigma)`` and/or ``map_features(features, sigma)``), such as
            ``fs_mllm.GaussianSmoothnessBooster``; checked against the model's feature size and sigma.
        processor: the model's processor or image processor, read for its image_mean/image_std.
        image_mean: the processor's per-channel mean (3 floats); given with ``image_std``, it wins over
            ``processor``.
        image_std: the processor's per-channel std (3 positive floats).
        **overrides: FSConfig fields applied on top of ``config``, e.g.
            ``patch_model(model, sigma=0.5, n_samples=16)``.

    Returns:
        ``model`` itself, patched.

    Raises:
        ValueError: ``model`` is not a torch.nn.Module or of an unsupported family; ``config`` is of
            another type (a saved folder: use ``fs_mllm.patch_from_saved``); an unknown or out-of-range
            setting; mean/std that are not 3 finite values (std > 0) or only one of them; a booster
            without the protocol or trained for another feature size or sigma range; ``smooth_video``
            for a family whose videos cannot be smoothed.
        RuntimeError: the installed transformers is outside the tested range (unless
            ``FS_MLLM_UNTESTED_TRANSFORMERS=1``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers multimodal model), got {type(model).__name__}")
    check_transformers_version()
    if isinstance(config, (str, os.PathLike)):  # the saved format is the hub's, a layer above this one
        raise ValueError(f"patch_model takes settings (an FSConfig or sigma=...), not a folder: to patch with the settings "
                         f"and booster saved in {os.fspath(config)!r}, call fs_mllm.patch_from_saved(model, "
                         f"{os.fspath(config)!r}); fs_mllm.from_pretrained({os.fspath(config)!r}) also loads its base model")
    if config is None:
        config = FSConfig()
    elif not isinstance(config, FSConfig):
        raise ValueError(f"config must be an fs_mllm.FSConfig or None, got {type(config).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(FSConfig)})
    if unknown:
        raise ValueError(f"patch_model got unknown settings {unknown}; FSConfig fields are "
                         f"{[f.name for f in dataclasses.fields(FSConfig)]}")
    config = config.replace(**overrides)
    adapter = get_adapter(model)
    hf_model = unwrap_model(model)
    mean, std = resolve_mean_std(model, adapter, processor, image_mean, image_std)
    if (std <= 0).any():
        raise ValueError(f"image_std must be positive per channel, got {std.tolist()}")
    if booster is not None:
        check = getattr(booster, "check_compatible", None)
        if not callable(check):
            raise ValueError("booster must implement check_compatible(feature_dim, sigma) (see fs_mllm.adapters.base.Booster)")
        if booster_stage(booster, "denoise") is None and booster_stage(booster, "map_features") is None:
            raise ValueError("booster has neither denoise(pixels01, sigma) nor map_features(features, sigma)")
        check(adapter.feature_dim(model), config.sigma)
    if config.smooth_video and not adapter.smooths_video:
        raise ValueError(
            f"smooth_video=True: fs_mllm cannot smooth {adapter.name} videos (their frames do not reach "
            f"{adapter.feature_function} in a layout the adapter understands); leave smooth_video=False, "
            "videos then pass through unsmoothed")
    owner = adapter.feature_owner(hf_model)
    if is_patched(hf_model):
        state: FSState = hf_model.__dict__[_STATE_ATTR]
        state.config, state.image_mean, state.image_std, state.booster = config, mean, std, booster
    else:
        state = FSState(config, adapter, mean, std, booster)
        hf_model.__dict__[_STATE_ATTR] = state
        _install(owner, adapter.feature_function, SmoothedFeatureFunction, hf_model, state)
        if adapter.video_function and callable(getattr(owner, adapter.video_function, None)):
            _install(owner, adapter.video_function, VideoScope, hf_model, state)
        adapter.on_patch(hf_model)
    hf_model.__dict__["fs_config"] = config
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove the patch: the original image-feature function comes back exactly.

    Args:
        model: a patched model (or a PEFT wrapper of one); an unpatched model is returned unchanged.

    Returns:
        ``model`` itself, unpatched.

    Raises:
        ValueError: ``model`` is not a torch.nn.Module.
    """
    hf_model = unwrap_model(model)
    if not is_patched(hf_model):
        return model
    state: FSState = hf_model.__dict__[_STATE_ATTR]
    owner = state.adapter.feature_owner(hf_model)
    for name, (had, previous) in state.saved.items():
        _restore(owner, name, had, previous)
    del hf_model.__dict__[_STATE_ATTR]
    hf_model.__dict__.pop("fs_config", None)
    return model


def original_feature_function(model: nn.Module, adapter: FamilyAdapter) -> Callable:
    """The model's own (unsmoothed) image-feature function, patched or not."""
    owner = adapter.feature_owner(model)
    current = getattr(owner, adapter.feature_function)
    smoothed = _smoothed_function(current)
    return current if smoothed is None else smoothed.__wrapped__


@contextlib.contextmanager
def undefended(model: nn.Module) -> Iterator[None]:
    """Within the block the model runs its original, unsmoothed image path (the transfer protocol's
    crafting side); the patch, with its config, mean/std and booster, comes back afterwards."""
    if not is_patched(model):
        yield
        return
    state = get_fs_state(model)
    unpatch_model(model)
    try:
        yield
    finally:
        patch_model(model, config=state.config, booster=state.booster, image_mean=state.image_mean, image_std=state.image_std)

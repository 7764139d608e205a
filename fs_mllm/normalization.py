"""The processor's per-channel mean/std: where it comes from when the model alone does not know it.

sigma is defined in [0,1] pixel space while models take normalised pixels, so the noise std per channel
is sigma / std_c: the smoothing, the certificate and the attacks all need the same mean/std, resolved
here in one order (explicit > processor > saved preprocessor config > family default, warned).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from .adapters.base import FamilyAdapter, unwrap_model

__all__ = ["resolve_mean_std"]



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


def _effective_mean_std(setting: Callable[[str, Any], Any]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, std) with pixel_values = (x - mean) / std for x in [0,1], from an image processor's settings.

    Most processors rescale by 1/255 and normalise by image_mean/std, which is then the answer. EfficientNet's
    (ALIGN's) may rescale by another factor with an offset of -1, skip the normalisation, or divide by
    image_std once more (``include_top``); reading image_mean/std alone would then put the noise at the
    wrong scale, so the processor's affine map is composed here. ``setting(name, default)`` reads one field.
    """
    normalize = setting("do_normalize", True) is not False
    mean, std = setting("image_mean", None), setting("image_std", None)
    include_top = bool(setting("include_top", False))
    if (normalize and (mean is None or std is None)) or (include_top and std is None):
        return None
    scale = 255.0 * float(setting("rescale_factor", None) or 1 / 255)
    offset = -1.0 if setting("rescale_offset", False) else 0.0
    ones = torch.ones(3)
    mean_n = _as_channels(mean, "image_mean") if normalize else 0 * ones
    std_n = _as_channels(std, "image_std") if normalize else ones
    top = _as_channels(std, "image_std") if include_top else ones
    # pixel_values = (scale * x + offset - mean_n) / (std_n * top)
    return (mean_n - offset) / scale, std_n * top / scale


def _mean_std_from_processor(processor: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    image_processor = getattr(processor, "image_processor", processor)
    return _effective_mean_std(lambda name, default: getattr(image_processor, name, default))


def _saved_setting(data: dict) -> Callable[[str, Any], Any]:
    """``setting(name, default)`` over a saved image processor config: a field the file omits takes its
    ``image_processor_type`` class's default (e.g. Gemma 4's do_normalize=False, EfficientNet's include_top=True),
    as the processor loaded from that file would, and ``default`` only when the class is unknown."""
    cls = None
    name = data.get("image_processor_type")
    if isinstance(name, str):
        try:
            from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

            cls = get_image_processor_class_from_name(name)
        except Exception:  # noqa: BLE001 - an unknown / unimportable class: the file's fields and the defaults
            cls = None

    def setting(key: str, default: Any) -> Any:
        if key in data:
            return data[key]
        try:
            return getattr(cls, key, default) if cls is not None else default
        except Exception:  # noqa: BLE001 - a dummy class (missing backend) that raises on attribute access
            return default

    return setting


def _mean_std_from_saved_config(name_or_path: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
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
            found = _effective_mean_std(_saved_setting(data))
            if found is not None:
                return found
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

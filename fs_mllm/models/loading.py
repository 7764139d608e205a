"""One loader for every entry point: the embedded ``fs-mini-llava``, a saved patched model (fs_config.json),
or any HF image-text-to-text model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

DEFAULT_MODEL = "fs-mini-llava"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_safetensors_model(model_class: Any, name_or_folder: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """``model_class.from_pretrained(..., use_safetensors=True)``: the one way fs_mllm loads model weights.

    Why: pickle weights (.bin/.pt) can run arbitrary code when loaded. A local folder without
    safetensors weights gets a ValueError naming it (transformers' own error does not say why).
    """
    folder = Path(name_or_folder)
    # transformers' weight files (model.safetensors, shards, variants): other safetensors (a booster) do not count
    if folder.is_dir() and not any(folder.glob("model*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found pickle weights: {', '.join(pickles)})" if pickles else ""
        raise ValueError(
            f"model folder {str(folder)!r} has no .safetensors weights{found}; fs_mllm loads safetensors only, never "
            "pickle (it can run code on load): convert once with model.save_pretrained(folder) in a trusted environment"
        )
    kwargs.pop("output_loading_info", None)  # always asked for here: the check below needs it
    model, info = model_class.from_pretrained(name_or_folder, use_safetensors=True, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:  # transformers would fill them with random values and only log it
        named = missing[:5] + mismatched[:5]
        raise ValueError(f"model weights in {str(name_or_folder)!r} are incomplete: {len(missing)} missing and "
                         f"{len(mismatched)} of another shape (e.g. {', '.join(named)}); the model would run with random "
                         "values there. Save the folder again, or check that its files were copied whole")
    return model


def load_model(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    processor: Optional[str] = None,
) -> tuple[Any, Any]:
    """(model, processor) from ``"fs-mini-llava"`` (embedded offline LLaVA), a Hub id or a local folder.

    A folder or repo id saved by ``fs_mllm.save_pretrained`` (it holds fs_config.json) gives the base
    model it names (its own weights, or the referenced base) and its processor, unpatched: every entry
    point applies its own variants (base / FS / FS+GSB). ``fs_mllm.from_pretrained`` returns it patched.
    ``processor`` names the processor's id/folder when it is not saved beside the model.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty str (model id or folder), got {model!r}")
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = os.path.expanduser(model)  # a quoted "~/models/x" reaches us unexpanded
    looks_like_path = model.startswith(("/", "./", "../")) or model.count("/") > 1  # a repo id is org/name
    if model != DEFAULT_MODEL and looks_like_path and not os.path.exists(model):
        raise ValueError(f"model {model!r} is not a folder (nothing at that path) and not a Hub repo id (org/name): "
                         "pass an existing model folder, a repo id, or fs-mini-llava")
    if model == DEFAULT_MODEL:
        from .mini_llava import load_mini_llava

        return load_mini_llava(device=device, dtype=torch_dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..hub import is_saved_patch, load_base

    if is_saved_patch(model):
        hf_model, saved_processor, _, _ = load_base(model, dtype=torch_dtype, load_processor=processor is None)
        return hf_model.to(device).eval(), saved_processor or AutoProcessor.from_pretrained(processor)
    hf_model = load_safetensors_model(AutoModelForImageTextToText, model, dtype=torch_dtype).to(device).eval()
    loaded_processor = AutoProcessor.from_pretrained(processor or model)
    return hf_model, loaded_processor

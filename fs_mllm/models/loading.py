"""One loader for every entry point: the embedded ``fs-mini-llava``, a saved patched model (fs_config.json),
or any HF image-text-to-text model."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

DEFAULT_MODEL = "fs-mini-llava"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    from ..hub.io import is_saved_patch, load_base, load_safetensors_model

    if is_saved_patch(model):
        hf_model, saved_processor, _, _ = load_base(model, dtype=torch_dtype, load_processor=processor is None)
        return hf_model.to(device).eval(), saved_processor or AutoProcessor.from_pretrained(processor)
    hf_model = load_safetensors_model(AutoModelForImageTextToText, model, dtype=torch_dtype).to(device).eval()
    loaded_processor = AutoProcessor.from_pretrained(processor or model)
    return hf_model, loaded_processor

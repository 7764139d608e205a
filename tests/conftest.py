"""Shared fixtures. Tiny random-weight models come from ``fs_mllm.testing``; console_script.py sits beside
the tests, on the import path pytest gives this folder ("prepend" import mode), so no test edits sys.path."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run fastest on one thread; on a busy shared CPU, more threads thrash (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

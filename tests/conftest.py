"""Shared fixtures. Test helpers (tiny_models, console_script) sit beside the tests; pytest puts this
folder on the import path (rootdir-relative "prepend" import mode), so no test edits sys.path."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run fastest on one thread; on a busy shared CPU, more threads thrash (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

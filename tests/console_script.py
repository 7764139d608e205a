"""Run the installed ``fs-mllm`` console script as a user would.

The script is found on PATH (``shutil.which``); PYTHONPATH is inherited, so a checkout on PYTHONPATH
(or the editable install CI makes) is the code under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}


def fs_mllm_script() -> str:
    path = shutil.which("fs-mllm")
    if path is None:
        pytest.fail("the fs-mllm console script is not installed (pip install -e .)")
    return path


def run_fs_mllm(args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``fs-mllm ARGS`` in ``cwd``; stdout/stderr captured as text."""
    return subprocess.run([fs_mllm_script(), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def start_fs_mllm(args: Sequence[str], cwd: Path) -> subprocess.Popen:
    """``fs-mllm ARGS`` started in the background (stdout/stderr piped as text), with SIGINT at its default
    as in a terminal: a suite run in the background (``cmd &``, nohup) inherits SIGINT ignored, and Python
    then never raises KeyboardInterrupt, so a Ctrl-C test would see the run finish instead."""
    import signal

    return subprocess.Popen([fs_mllm_script(), *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def failure(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"

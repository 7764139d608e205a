"""Run the installed ``fs-mllm`` console script as a user would, or its entry point in this process.

The script is found on PATH (``shutil.which``); PYTHONPATH is inherited, so a checkout on PYTHONPATH
(or the editable install CI makes) is the code under test. One subprocess test per command runs the
script itself; the other cases of a command (a refused flag, --help, a variant, a rerun) go through
:func:`console_in_process`: the same entry point, parser, exit status and output, without the seconds a
new interpreter spends on imports and the model load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def console_in_process(args: Sequence[str], monkeypatch, capsys, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``fs-mllm ARGS`` through the console script's entry point (``fs_mllm.cli:console_main``) in this process,
    as the installed script's ``sys.exit(console_main())`` ends: its return value is the exit status; a
    SystemExit gives its code (argparse: 2 for a usage error, 0 after --help) or, for ``sys.exit(message)``,
    the message on stderr and status 1. ``cwd``: the folder it runs in (relative paths resolve there).
    Returns what :func:`run_fs_mllm` returns: the status and the captured stdout/stderr as text."""
    from fs_mllm.cli import console_main

    capsys.readouterr()  # only this command's output
    monkeypatch.setattr(sys, "argv", ["fs-mllm", *args])
    if cwd is not None:
        monkeypatch.chdir(cwd)
    try:
        status = console_main()
    except SystemExit as exc:
        status = exc.code
        if status is None:
            status = 0
        elif not isinstance(status, int):
            print(status, file=sys.stderr)
            status = 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["fs-mllm", *args], status, captured.out, captured.err)

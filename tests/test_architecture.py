"""The import contract (.ci/check_imports.py): no cycles, no import up the layers, every module in a layer.

Run the way CI runs it (a subprocess from the repository root); then on a copy of the package with a planted
upward import, a planted cycle and an unlisted module, where it must fail and name each one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / ".ci" / "check_imports.py"


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True, timeout=120)


def test_the_package_has_no_import_cycles_and_no_upward_imports():
    result = run_check(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no cycles, no upward imports" in result.stdout


def test_the_check_names_an_upward_import_a_cycle_and_an_unlisted_module(tmp_path):
    shutil.copytree(REPO / "fs_mllm", tmp_path / "fs_mllm", ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    package = tmp_path / "fs_mllm"
    with open(package / "patching.py", "a", encoding="utf-8") as handle:  # patching must stay below the hub
        handle.write("\n\ndef _load(folder):\n    from .hub import patch_from_saved\n\n    return patch_from_saved\n")
    with open(package / "config.py", "a", encoding="utf-8") as handle:
        handle.write("\n\ndef _late():\n    import fs_mllm.compat\n")
    with open(package / "compat.py", "a", encoding="utf-8") as handle:
        handle.write("\n\ndef _late():\n    from fs_mllm import config\n")
    (package / "stray.py").write_text("VALUE = 1\n")
    result = run_check(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any("fs_mllm.patching (layer 'patching') imports fs_mllm.hub" in line for line in lines), result.stdout
    assert any(line.startswith("import cycle among fs_mllm.compat, fs_mllm.config") for line in lines), result.stdout
    assert any(line.startswith("fs_mllm.stray: in no layer") for line in lines), result.stdout
    # the planted upward import closes a loop too (hub.io imports patching): named as a cycle as well
    assert any(line.startswith("import cycle among fs_mllm.hub, fs_mllm.hub.io, fs_mllm.patching") for line in lines)
    assert len(lines) == 4, result.stdout  # nothing else: the copy is the package as it is

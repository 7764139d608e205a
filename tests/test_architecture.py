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


def test_the_check_names_upward_imports_cycles_and_an_unlisted_module(tmp_path):
    shutil.copytree(REPO / "fs_mllm", tmp_path / "fs_mllm", ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    package = tmp_path / "fs_mllm"

    def plant(module: str, code: str) -> None:
        with open(package / module, "a", encoding="utf-8") as handle:
            handle.write("\n\n" + code)

    plant("patching.py", "def _load(folder):\n    from .hub import patch_from_saved\n\n    return patch_from_saved\n")
    plant("config.py", "def _late():\n    import fs_mllm.compat\n")  # a loop inside one layer
    plant("compat.py", "def _late():\n    from fs_mllm import config\n")
    plant("stats.py", "def _late():\n    from fs_mllm import from_pretrained\n")  # the package's own name: the top
    # a loop through a package __init__: importing evaluation.caption runs evaluation/__init__ first
    plant("evaluation/__init__.py", "def _late():\n    from fs_mllm.booster.through_lm import main\n")
    plant("booster/through_lm.py", "def _late():\n    from fs_mllm.evaluation.caption import java_available\n")
    (package / "stray.py").write_text("VALUE = 1\n")
    (package / "booster" / "stray.py").write_text("VALUE = 1\n")  # a package listed module by module: each is named
    result = run_check(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    expected = {
        "upward patching -> hub": lambda line: "fs_mllm.patching (layer 'patching') imports fs_mllm.hub " in line,
        "upward stats -> package": lambda line: "fs_mllm.stats (layer 'foundations') imports fs_mllm (layer 'application'" in line,
        "cycle hub / patching": lambda line: line.startswith("import cycle among fs_mllm.hub, fs_mllm.hub.io, fs_mllm.patching:"),
        "cycle compat / config": lambda line: line.startswith("import cycle among fs_mllm.compat, fs_mllm.config:"),
        "cycle evaluation / through_lm": lambda line: line.startswith("import cycle among fs_mllm.booster.through_lm, fs_mllm.evaluation:"),
        "cycle package / stats": lambda line: line.startswith("import cycle among fs_mllm, ") and "fs_mllm.stats -> fs_mllm " in line,
        "unlisted": lambda line: line.startswith("fs_mllm.stray: in no layer"),
        "unlisted booster module": lambda line: line.startswith("fs_mllm.booster.stray: in no layer"),
    }
    lines = result.stdout.splitlines()
    for what, matches in expected.items():
        assert any(matches(line) for line in lines), (what, result.stdout)
    unexplained = [line for line in lines if not any(matches(line) for matches in expected.values())]
    assert not unexplained, unexplained  # nothing else: the rest of the copy is the package as it is

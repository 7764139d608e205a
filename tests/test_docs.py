"""The docs site (issue 31): every code block of docs/*.md runs, generated pages match their sources.

- python blocks are executed as written (in a fresh folder), as tests/test_readme.py does for README.md;
- bash blocks with `fs-mllm` commands run as subprocesses of the installed console script, quick sizes
  appended (tests/test_readme.py's QUICK); the command-line block of docs/evaluations.md is run by
  tests/test_readme.py::test_readme_command_runs_as_written;
- a block that cannot run starts with `# not run in tests: <reason>` (the reason is required);
- docs/results.md (benchmarks/summarize.py --page results), docs/cli.md (docs/gen_cli.py) and docs/api.md
  (docs/gen_api.py, one `::: fs_mllm.NAME` per name of fs_mllm.__all__) are regenerated and must equal the
  committed pages.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from console_script import ENV, failure, fs_mllm_script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MARKER = "# not run in tests:"
REQUIRED = ("index", "concepts", "patching", "certification", "evaluations", "booster", "hub", "cli",
            "performance", "results", "contributing", "api")
CLI_SECTION = "## Evaluations and the command line"  # its bash block: tests/test_readme.py runs each command


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def excepted(block: str) -> bool:
    first = block.lstrip().splitlines()[0] if block.strip() else ""
    if first.startswith(MARKER):
        assert first[len(MARKER):].strip(), f"a `{MARKER}` marker needs a reason: {first!r}"
        return True
    return first.startswith("# not run in tests")


def cli_block(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    if CLI_SECTION not in text:
        return ""
    return text.split(CLI_SECTION, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]


def test_every_page_of_the_issue_exists_and_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in REQUIRED:
        assert (DOCS / f"{page}.md").is_file(), page
    for page in PAGES:
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"


def test_every_code_block_is_python_bash_or_text():
    for page in PAGES:
        languages = re.findall(r"^```(\S*)\n", page.read_text(encoding="utf-8"), re.M)
        # the closing fences match the pattern too, with an empty language: count opening ones only
        opening = languages[0::2]
        assert set(opening) <= {"python", "bash", "text"}, (page.name, opening)


@pytest.mark.parametrize("page", [p for p in PAGES if any(not excepted(b) for b in blocks(p.read_text(encoding="utf-8"), "python"))],
                         ids=lambda p: p.name)
def test_python_examples_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in blocks(page.read_text(encoding="utf-8"), "python"):
        if not excepted(block):
            exec(compile(block, str(page.relative_to(ROOT)), "exec"), {"__name__": "docs_example"})


def bash_commands() -> list[tuple[str, list[list[str]]]]:
    """(page, the block's commands) of every bash block not excepted and not the command-line block."""
    out = []
    for page in PAGES:
        skip = cli_block(page)
        for block in blocks(page.read_text(encoding="utf-8"), "bash"):
            if excepted(block) or block == skip:
                continue
            out.append((page.name, [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]))
    return out


def test_every_bash_block_is_run_or_excepted_with_a_reason():
    for page, commands in bash_commands():
        for argv in commands:
            assert argv and argv[0] == "fs-mllm", f"{page}: {argv} is neither an fs-mllm command nor marked `{MARKER} <reason>`"


@pytest.mark.parametrize("page, commands", bash_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_bash_commands_run_as_written(page, commands, tmp_path):
    """The block's commands, in order in one folder, as subprocesses of the installed console script."""
    from test_readme import QUICK

    for name in ("fs_mllm", "recipes", "benchmarks"):  # the commands are run from a checkout: its relative paths resolve
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    for argv in commands:
        command = [fs_mllm_script(), *argv[1:], *QUICK.get(argv[1], [])]
        proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, (page, argv, failure(proc))


def generator(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_documents_exactly_the_public_names():
    import fs_mllm

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    assert re.findall(r"^::: fs_mllm\.(\w+)$", text, re.M) == list(fs_mllm.__all__)
    assert generator("gen_api").page() == text, "run `python docs/gen_api.py`"


def test_cli_reference_is_what_the_parsers_print():
    assert generator("gen_cli").page() == (DOCS / "cli.md").read_text(encoding="utf-8"), "run `python docs/gen_cli.py`"


def test_results_page_is_what_summarize_writes_from_the_results(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--page", "results", "--docs", str(tmp_path)]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == (DOCS / "results.md").read_text(encoding="utf-8"), \
        "run `python benchmarks/summarize.py --page results`"
    for png in sorted((tmp_path / "img").glob("*.png")):  # the plots: same names, committed, not empty
        assert (DOCS / "img" / png.name).stat().st_size > 0, png.name
    assert {p.name for p in (tmp_path / "img").glob("*.png")} <= {p.name for p in (DOCS / "img").glob("*.png")}


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                          env={**ENV, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)

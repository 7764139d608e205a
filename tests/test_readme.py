"""The README's set-up commands and examples are the ones that work, and so are the commands of the
docs page they moved to (docs/evaluations.md, "Evaluations and the command line"; issue 31)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# the command-line section moved from the README to this docs page (issue 31); its commands run here as before
CLI_PAGE = ROOT / "docs" / "evaluations.md"
CLI_SECTION = "## Evaluations and the command line"


def bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_exactly_two_setup_commands_main_job_and_tests():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, re.S)]
    assert len(blocks) == 2
    main_job, tests = blocks
    assert main_job.startswith("pip install torch==2.13.0") and main_job.endswith("fs-mllm demo")
    assert tests.startswith("pip install torch==2.13.0") and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    tests_command = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, re.S)][1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests_command in ci


def test_python_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    runnable = [b for b in blocks if not b.lstrip().startswith("# not run in tests")]
    assert runnable, "the README has no runnable python examples"
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})


# ---------------------------------------------------------------------------------------------
# every command of "Evaluations and the command line" (now docs/evaluations.md), run as a user runs it (issue 14 item 1)
# ---------------------------------------------------------------------------------------------

# Appended to the README's own command line: argparse keeps an option's last value, so these only
# shrink the run (one or two examples, one attack step, few samples) and never change what is run.
QUICK = {
    "certify": ["--limit", "1", "--n", "20"],
    "attack": ["--limit", "1", "--steps", "1", "--eot-samples", "1", "--n-samples", "2", "--max-new-tokens", "3"],
    "eval": ["--limit", "1", "--attack-steps", "1", "--n-samples", "2", "--max-new-tokens", "3", "--no-progress"],
    "recipes/eval_vqa.py": ["--limit", "2", "--n-samples", "2", "--max-new-tokens", "3", "--no-progress"],
    "train-gsb": ["--denoiser-steps", "1", "--mapper-steps", "1", "--batch-size", "1", "--mapper-batch-size", "2",
                  "--size", "56", "--denoiser-channels", "8", "--denoiser-depth", "2", "--mapper-hidden", "16",
                  "--eval-n", "0"],
}
SKIPPED = {"demo"}  # `fs-mllm demo` runs as a subprocess in test_defense.py


def cli_commands() -> list[list[str]]:
    import shlex

    block = CLI_PAGE.read_text(encoding="utf-8").split(CLI_SECTION, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def _output_folder(argv: list[str]) -> str:
    for option in ("--output-dir", "--out"):
        if option in argv:
            return argv[argv.index(option) + 1]
    assert argv[:2] == ["fs-mllm", "certify"], f"no output folder in {argv}"
    return "fs_mllm_outputs/certify"


def _check_outputs(argv: list[str], folder: Path) -> None:
    import json

    command = argv[1]
    if command == "certify":
        assert len((folder / "certificates.jsonl").read_text().splitlines()) == 1
        for name in ("certified_curve.png", "report.md", "summary.json"):
            assert (folder / name).stat().st_size > 0, name
        settings = json.loads((folder / "summary.json").read_text())["settings"]
        assert settings["command"] == "certify" and "run" not in settings  # plain settings, no function repr
    elif command == "attack":
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        assert sorted(r["mode"] for r in rows) == ["base", "fs"]
        assert all(Path(r["adv_image"]).is_file() for r in rows)
    elif command == "train-gsb":
        assert (folder / "final" / "gsb.safetensors").stat().st_size > 0
        assert (folder / "train_summary.json").stat().st_size > 0
    else:  # eval vqa / eval caption / the launched recipe
        summary = json.loads((folder / "summary.json").read_text())
        shards = sorted(p.name for p in folder.glob("results.rank*.jsonl"))
        nproc = int(argv[argv.index("--num_processes") + 1]) if "--num_processes" in argv else 1
        assert shards == [f"results.rank{r}.jsonl" for r in range(nproc)]
        assert summary["num_examples"] == (2 if nproc > 1 else 1)
        variants = summary["settings"]["variants"]
        budgets = len(summary["settings"]["attack_eps"]) + 1
        assert len(summary["table"]["rows"]) == len(variants) * budgets
        assert (folder / "summary.md").stat().st_size > 0


def test_readme_is_short_and_links_the_docs():
    """Issue 31: the README is one or two screens; the rest lives in docs/ (and the README links the pages)."""
    assert len(README.splitlines()) <= 250
    for page in ("index", "concepts", "patching", "certification", "evaluations", "booster", "hub", "cli",
                 "performance", "results", "contributing", "api"):
        assert f"(docs/{page}.md)" in README, page


def test_readme_lists_every_command():
    commands = {argv[1] if argv[0] == "fs-mllm" else argv[-1] for argv in cli_commands()}
    assert {"demo", "certify", "attack", "eval", "train-gsb"} <= commands


def _slow_tier(argv: list[str]) -> bool:
    """The docs' commands whose code another default-tier run already covers (issue 33: one subprocess run per
    console command, not per flag): the multi-process launch, and `eval vqa` on the synthetic set under the
    adaptive attack (the synthetic set and FS+GSB run in the transfer command, the adaptive attack on the photos)."""
    return argv[0] == "accelerate" or (argv[1:3] == ["eval", "vqa"] and "fs-synthetic-heldout" in argv
                                       and "--protocol" not in argv)


@pytest.mark.parametrize("argv", [pytest.param(a, marks=[pytest.mark.slow] if _slow_tier(a) else [])
                                  for a in cli_commands() if a[1] not in SKIPPED], ids=" ".join)
def test_readme_command_runs_as_written(argv, tmp_path):
    """The docs' command (docs/evaluations.md), as a subprocess of the installed console script (quick sizes appended)."""
    import shutil
    import subprocess

    from console_script import ENV, failure, fs_mllm_script

    argv = list(argv)
    if argv[0] == "fs-mllm":
        command = [fs_mllm_script(), *argv[1:], *QUICK[argv[1]]]
    else:  # accelerate launch ... recipes/eval_vqa.py: the recipe from this checkout, on a free port
        assert argv[:2] == ["accelerate", "launch"], argv
        script = next(a for a in argv if a.startswith("recipes/"))
        command = [shutil.which("accelerate"), "launch", "--main_process_port", str(_free_port()), *argv[2:],
                   *QUICK[script]]
        command[command.index(script)] = str(ROOT / script)
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, failure(proc)
    _check_outputs(argv, tmp_path / _output_folder(argv))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

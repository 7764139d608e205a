"""The README's set-up commands and examples are the ones that work."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


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

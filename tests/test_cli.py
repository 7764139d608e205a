"""Each fs-mllm subcommand runs end to end on tiny settings, on the embedded real model."""

import json
import sys

import pytest

from fs_mllm.cli import build_parser, main

pytest.importorskip("onnx")
pytest.importorskip("gguf")


def test_help_explains_every_option(monkeypatch, capsys):
    import runpy
    import warnings

    for command in ("demo", "certify"):
        parser = build_parser()
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"
    # `python -m fs_mllm.cli --help`, in-process: the module run as __main__ with that argv, as -m runs it
    monkeypatch.setattr(sys, "argv", ["fs_mllm.cli", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exc:
        # runpy notes that this test already imported fs_mllm.cli; a fresh `python -m` has not
        warnings.filterwarnings("ignore", message="'fs_mllm.cli' found in sys.modules", category=RuntimeWarning)
        runpy.run_module("fs_mllm.cli", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "certify", "attack", "eval", "train-gsb"):
        assert command in out


def test_bad_arguments_get_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["certify", "--radii", "-1"])
    assert "radii" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "speech"])


def test_certify_writes_certificates_curve_and_report(tmp_path, shared_mini_llava):
    out = tmp_path / "certify"
    main(["certify", "--limit", "1", "--n", "20", "--output-dir", str(out)])
    lines = (out / "certificates.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert 0 <= record["score_lower"] <= record["score_mean"] <= 1 and record["n"] == 20
    assert (out / "certified_curve.png").stat().st_size > 0
    assert "FCSB" in (out / "report.md").read_text()


def test_console_script_exits_zero_after_a_run(monkeypatch):
    """The installed ``fs-mllm`` returns an exit status, not main's results (a dict would exit 1)."""
    import configparser
    from pathlib import Path

    import fs_mllm.cli as cli

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert setup["options.entry_points"]["console_scripts"].strip() == "fs-mllm = fs_mllm.cli:console_main"
    monkeypatch.setattr(cli, "main", lambda argv=None: {"rows": []})
    assert cli.console_main() == 0


# ---------------------------------------------------------------------------------------------
# the commands that run package modules (issue 13 item 5, issue 14 items 1, 9, 11, 13, 18)
# ---------------------------------------------------------------------------------------------

HELP_OPTIONS = {
    ("attack",): ("--eps", "--modes", "--out"),
    ("eval", "vqa"): ("--attack-eps", "--variants", "--output-dir"),
    ("eval", "caption"): ("--prompt", "--variants", "--output-dir"),
    ("eval-vqa",): ("--attack-eps",),
    ("eval-caption",): ("--prompt",),
    ("train-gsb",): ("--denoiser-steps", "--init-from", "--output-dir"),
}


@pytest.mark.parametrize("command", list(HELP_OPTIONS), ids=" ".join)
def test_command_help_lists_its_options(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fs-mllm {' '.join(command)}")
    for option in HELP_OPTIONS[command]:
        assert option in out


def test_console_eval_help_as_a_user_runs_it(tmp_path, monkeypatch, capsys):
    """Through the console script's entry point (console_main), in-process: `fs-mllm eval vqa` itself runs as the
    installed script in tests/test_readme.py."""
    from console_script import console_in_process, failure

    proc = console_in_process(["eval", "vqa", "--help"], monkeypatch, capsys, cwd=tmp_path)
    assert proc.returncode == 0, failure(proc)
    assert proc.stdout.startswith("usage: fs-mllm eval vqa") and "--attack-eps" in proc.stdout


RECIPE_SHIMS = ("attack_pipeline", "eval_vqa", "eval_caption", "train_gsb")


@pytest.mark.parametrize("name", RECIPE_SHIMS)
def test_recipes_are_shims_over_the_package(name, monkeypatch, capsys):
    """A recipe only hands its argv to the package (so it works from a wheel and never drifts)."""
    import ast
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    source = path.read_text()
    assert "sys.path" not in source
    body = ast.parse(source).body
    code = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert len(code) <= 5, f"{path.name} holds logic; it belongs in the package"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])  # run as `python recipes/NAME.py --help`
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(path), run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {path.name} ") and "--" in out


def test_certify_writes_nothing_when_it_fails_midway(tmp_path, monkeypatch, shared_mini_llava):
    """Issue 14 item 9: results are written at the end, all at once, or not at all."""
    import fs_mllm.evaluation.certified_features as features

    real, calls = features.certify_images, []

    def fail_on_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure on the second image")
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "certify_images", fail_on_second_image)
    out = tmp_path / "certify"
    with pytest.raises(RuntimeError, match="simulated"):
        main(["certify", "--limit", "2", "--n", "10", "--output-dir", str(out)])
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def _attack_argv(out):
    return ["attack", "--model", "fs-mini-llava", "--offline-eval", "vqa", "--limit", "2", "--modes", "base",
            "--steps", "1", "--max-new-tokens", "3", "--out", str(out)]


def test_attack_resumes_after_a_torn_line_and_skips_done_rows(tmp_path, monkeypatch, capsys, shared_mini_llava):
    """Issue 14 item 11: a torn last line is cut, not glued onto; a rerun computes only what is missing."""
    import fs_mllm.evaluation.attack_pipeline as pipeline

    calls = []
    real_attack = pipeline.attack
    monkeypatch.setattr(pipeline, "attack", lambda *a, **k: calls.append(1) or real_attack(*a, **k))
    out = tmp_path / "attack"
    main(_attack_argv(out))
    assert len(calls) == 2
    results = out / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    results.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second row
    main(_attack_argv(out))
    assert len(calls) == 3, "the rerun recomputed a finished row"
    text = results.read_text()
    assert text.startswith(lines[0]) and text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line parses: nothing glued to the fragment
    assert [r["example"] for r in rows] == [json.loads(line)["example"] for line in lines]
    assert len({json.dumps(r["key"]) for r in rows}) == 2
    capsys.readouterr()
    main(_attack_argv(out))
    assert len(calls) == 3 and results.read_text() == text
    assert "| base | 2 |" in capsys.readouterr().out  # the summary covers the rows of earlier runs


def test_second_writer_on_a_folder_is_refused(tmp_path, monkeypatch, capsys):
    """Issue 14 item 13: while a run holds the folder, another run on it stops with a clear error. The second
    run goes through the console script's entry point in-process (console_main: same exit status and stderr;
    the lock is a flock, which a second open of the file is refused in one process as in another)."""
    from console_script import console_in_process, failure
    from fs_mllm.results import ResultsBusyError, ResultsLock
    from fs_mllm.evaluation.runner import shard_path

    out = tmp_path / "vqa"
    out.mkdir()
    lock = ResultsLock(shard_path(out, 0))
    try:
        proc = console_in_process(["eval", "vqa", "--limit", "1", "--output-dir", str(out)], monkeypatch, capsys, cwd=tmp_path)
    finally:
        lock.release()
    assert proc.returncode == 1, failure(proc)
    assert f"another run is writing to {out}" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(out.glob("results.rank*.jsonl")) and not (out / "settings.json").exists()

    attack_out = tmp_path / "attack"
    attack_out.mkdir()
    lock = ResultsLock(attack_out / "results.jsonl")
    try:
        with pytest.raises(ResultsBusyError, match=f"another run is writing to {attack_out}"):
            main(_attack_argv(attack_out))
    finally:
        lock.release()
    assert not (attack_out / "results.jsonl").exists()


def test_ctrl_c_says_how_to_resume_and_the_rerun_resumes(tmp_path, monkeypatch, capsys, shared_mini_llava, one_thread):
    """Issue 14 item 18: SIGINT mid-run exits 130 with one line (no traceback); the same command resumes. The
    interrupted run is the installed script (a real SIGINT); the rerun goes through its entry point in-process
    (console_main: same parser, exit status and output), on the session's fs-mini-llava."""
    import signal
    import time

    from console_script import console_in_process, failure, start_fs_mllm

    argv = ["eval", "vqa", "--limit", "1", "--variants", "base,fs", "--attack-eps", "0.5", "--attack-steps", "1",
            "--n-samples", "2", "--max-new-tokens", "3", "--no-progress", "--output-dir", "out"]
    shard = tmp_path / "out" / "results.rank0.jsonl"
    proc = start_fs_mllm(argv, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if shard.exists() and shard.read_text().count("\n") >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err, err[-3000:]
    written = shard.read_text().count("\n")
    assert 1 <= written < 4
    rerun = console_in_process(argv, monkeypatch, capsys, cwd=tmp_path)
    assert rerun.returncode == 0, failure(rerun)
    keys = [tuple(json.loads(line)["key"]) for line in shard.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 2 * 2  # (example) x (base, fs) x (clean, eps 0.5)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_examples"] == 1


@pytest.mark.slow
def test_a_null_attack_succeeds_nowhere_as_a_user_runs_it(tmp_path):
    """An attack that moves no answer has attack success 0, whatever the model got wrong before it: a wrong
    answer staying wrong used to count as a success (100% in `fs-mllm attack`, "answer changed" in eval)."""
    from console_script import failure, run_fs_mllm

    proc = run_fs_mllm(["eval", "vqa", "--dataset", "fs-synthetic-heldout", "--variants", "base", "--attack-eps", "0.000001",
                        "--attack-steps", "1", "--limit", "6", "--max-new-tokens", "3", "--no-progress",
                        "--output-dir", "eval"], cwd=tmp_path)
    assert proc.returncode == 0, failure(proc)
    rows = json.loads((tmp_path / "eval" / "summary.json").read_text())["table"]["rows"]
    clean, attacked = sorted(rows, key=lambda r: r["eps"])
    assert attacked["vqa_accuracy"] == clean["vqa_accuracy"] > 0  # nothing moved, and something was right
    assert attacked["attack_success_rate"] == 0.0 and attacked["counted"] == round(clean["vqa_accuracy"] * 6) > 0

    proc = run_fs_mllm(["attack", "--offline-eval", "vqa", "--limit", "3", "--objective", "untargeted", "--norm", "l2",
                        "--eps", "0.000001", "--steps", "1", "--no-random-start", "--modes", "base", "--max-new-tokens", "3",
                        "--out", "attack"], cwd=tmp_path)
    assert proc.returncode == 0, failure(proc)
    results = [json.loads(line) for line in (tmp_path / "attack" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 3 and all(r["adv_output"] == r["clean_output"] for r in results)
    assert all(r["success"] is None or r["success"] is False for r in results)  # None: wrong before the attack
    assert "| counted |" in proc.stdout  # the table says over how many questions the rate is taken


def test_feature_certification_has_a_python_api_with_the_commands_checks(tmp_path, shared_mini_llava):
    """``fs-mllm certify`` (features) is run_certify_features over a FeatureCertifySettings: the same files, the
    same certificates; a bad value is a ValueError naming the field before any model loads."""
    from fs_mllm.evaluation.certified_features import FeatureCertifySettings, run_certify_features

    for bad, field in (({"n": 1}, "n"), ({"sigma": 0}, "sigma"), ({"method": "x"}, "method"), ({"limit": 0}, "limit"),
                       ({"radii": ()}, "radii"), ({"radii": 0.25}, "radii"), ({"booster": str(tmp_path / "none")}, "booster"),
                       ({"booster": 5}, "booster"), ({"images": str(tmp_path / "none")}, "images"), ({"images": 123}, "images"),
                       ({"model": ""}, "model"), ({"model": None}, "model"), ({"size": 8}, "size"), ({"size": 5000}, "size")):
        with pytest.raises(ValueError, match=field):
            FeatureCertifySettings(**bad)
    settings = FeatureCertifySettings(limit=1, n=10, seed=3, radii=(0.125,))
    result = run_certify_features(settings, tmp_path / "py", progress=False)
    main(["certify", "--limit", "1", "--n", "10", "--seed", "3", "--radii", "0.125", "--output-dir", str(tmp_path / "cli")])
    for name in ("certificates.jsonl", "certified_curve.png", "report.md", "summary.json"):
        assert (tmp_path / "py" / name).stat().st_size > 0, name
    assert (tmp_path / "py" / "certificates.jsonl").read_text() == (tmp_path / "cli" / "certificates.jsonl").read_text()
    assert result["certificates"][0].n == 10 and "FCSB@0.125" in result["markdown"]
    stored = json.loads((tmp_path / "py" / "summary.json").read_text())["settings"]
    assert {k: v for k, v in stored.items() if k not in ("command", "output_dir")} == settings.to_dict()

"""Each fs-mllm subcommand runs end to end on tiny settings, on the embedded real model."""

import json
import subprocess
import sys

import pytest

from fs_mllm.cli import build_parser, main

pytest.importorskip("onnx")
pytest.importorskip("gguf")


def test_help_explains_every_option():
    for command in ("demo", "certify"):
        parser = build_parser()
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"
    out = subprocess.run([sys.executable, "-m", "fs_mllm.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "certify", "attack", "eval", "train-gsb"):
        assert command in out


def test_bad_arguments_get_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["certify", "--radii", "-1"])
    assert "radii" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "speech"])


def test_certify_writes_certificates_curve_and_report(tmp_path):
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

"""Bad command-line values stop ``fs-mllm`` while parsing: exit status 2, the usage line, the option
named, and nothing loaded or written (item 17 of issue 14: checked before any work, not after minutes)."""

from __future__ import annotations

import pytest

from console_script import console_in_process, failure, run_fs_mllm
from fs_mllm.cli import main

OUT = "--output-dir"
BAD = [
    # (command line before the output folder option, option named in the error)
    (["certify", "--limit", "-1"], "--limit"),
    (["certify", "--limit", "0"], "--limit"),
    (["certify", "--n", "1"], "--n"),
    (["certify", "--alpha", "2"], "--alpha"),
    (["certify", "--alpha", "0"], "--alpha"),
    (["certify", "--sigma", "0"], "--sigma"),
    (["certify", "--sigma", "nan"], "--sigma"),
    (["certify", "--radii", "0.1,nan"], "--radii"),
    (["certify", "--radii", "0.1,inf"], "--radii"),
    (["certify", "--radii", ","], "--radii"),
    (["certify", "--size", "0"], "--size"),
    (["attack", "--limit", "0"], "--limit"),
    (["attack", "--eps", "0"], "--eps"),
    (["attack", "--eps", "nan"], "--eps"),
    (["attack", "--steps", "0"], "--steps"),
    (["attack", "--step-size", "-0.1"], "--step-size"),
    (["attack", "--sigma", "-1"], "--sigma"),
    (["attack", "--n-samples", "0"], "--n-samples"),
    (["attack", "--eot-samples", "0"], "--eot-samples"),
    (["attack", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "vqa", "--limit", "0"], "--limit"),
    (["eval", "vqa", "--sigma", "0"], "--sigma"),
    (["eval", "vqa", "--n-samples", "0"], "--n-samples"),
    (["eval", "vqa", "--attack-eps", "0.5", "nan"], "--attack-eps"),
    (["eval", "caption", "--attack-steps", "0"], "--attack-steps"),
    (["eval", "caption", "--certify-alpha", "1"], "--certify-alpha"),
    (["eval", "vqa", "--objective", "targeted", "--attack-eps", "0.5"], "--objective='targeted' needs --target"),
    (["save", "--model", "fs-mini-llava", "--n-samples", "0"], "--n-samples"),
    (["eval-vqa", "--eot-samples", "0"], "--eot-samples"),
    (["eval-caption", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["train-gsb", "--denoiser-steps", "-1"], "--denoiser-steps"),
    (["train-gsb", "--batch-size", "0"], "--batch-size"),
    (["train-gsb", "--size", "0"], "--size"),
    (["train-gsb", "--sigma-min", "0"], "--sigma-min"),
    (["train-gsb", "--heldout-fraction", "1.5"], "--heldout-fraction"),
    (["train-gsb", "--clean-fraction", "1"], "--clean-fraction"),
    (["train-gsb", "--eval-n", "1"], "--eval-n"),
    (["train-gsb", "--eval-sigmas", "0.25", "inf"], "--eval-sigmas"),
    (["train-gsb", "--denoiser-lr", "0"], "--denoiser-lr"),
]


def _out_option(command: str) -> str:
    return "--out" if command == "attack" else OUT


@pytest.mark.parametrize("argv,option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_exits_2_with_usage_before_any_work(argv, option, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(argv + [_out_option(argv[0]), str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fs-mllm" in err and option in err, err
    assert not out.exists(), "a rejected command wrote its output folder"


def test_certify_radii_nan_as_a_user_runs_it(tmp_path, monkeypatch, capsys):
    """Issue 14 item 9: every image certified, then a ValueError and an empty certificates.jsonl. Through the
    console script's entry point in-process (console_main: same parser, exit status, stderr); `fs-mllm certify`
    runs as the installed script in tests/test_readme.py and below."""
    proc = console_in_process(["certify", "--radii", "0.1,nan", "--output-dir", "out"], monkeypatch, capsys, cwd=tmp_path)
    assert proc.returncode == 2, failure(proc)
    assert "usage: fs-mllm certify" in proc.stderr and "--radii" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_eval_without_a_task_is_a_usage_error(capsys):
    for argv in (["eval"], ["eval", "speech"], ["eval", "--limit", "2"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "usage: fs-mllm eval {vqa,caption}" in capsys.readouterr().err


def test_certify_seed_chunk_size_and_normalize(tmp_path, capsys, monkeypatch, shared_mini_llava):
    """A published certificate should use a seed the attacker does not know: `fs-mllm certify --seed` sets the
    noise and is recorded in the summary; --normalize token certifies per token; bad values are usage errors
    before any work. In-process through the console script's own parser, on the session's fs-mini-llava (the
    README's `fs-mllm certify` runs as a subprocess in tests/test_readme.py)."""
    import json

    monkeypatch.chdir(tmp_path)
    means = {}
    for seed in (0, 12345):
        out = f"out{seed}"
        main(["certify", "--limit", "1", "--n", "20", "--seed", str(seed), "--output-dir", out])
        assert json.loads((tmp_path / out / "summary.json").read_text())["settings"]["seed"] == seed
        means[seed] = json.loads((tmp_path / out / "certificates.jsonl").read_text())["score_mean"]
    assert means[0] != means[12345]
    main(["certify", "--limit", "1", "--n", "20", "--normalize", "token", "--chunk-size", "7", "--output-dir", "token"])
    record = json.loads((tmp_path / "token" / "certificates.jsonl").read_text())
    assert record["normalize"] == "token" and record["n"] == 20
    capsys.readouterr()
    for option, value, needle in (("--seed", "-1", "2**63"), ("--chunk-size", "0", "positive integer"),
                                  ("--normalize", "tokens", "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            main(["certify", option, value, "--output-dir", "bad"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and option in err and needle in err, err
        assert not (tmp_path / "bad").exists()


def _inputs(folder):
    """Fixtures of the review that found these cases: an empty folder, a file that is no image, two images
    sharing a stem, a 16-bit grey PNG."""
    import numpy as np
    from PIL import Image

    (folder / "empty").mkdir()
    (folder / "notimage").mkdir()
    (folder / "notimage" / "a.png").write_bytes(b"not a png")
    (folder / "stems").mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "stems" / "a.png")
    Image.new("RGB", (32, 32), "blue").save(folder / "stems" / "a.jpg")
    (folder / "grey16").mkdir()
    Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)).save(folder / "grey16" / "g.png")


FOUND_WHILE_RUNNING = [
    (["certify", "--images", "empty", "--output-dir", "out"], 1, "--images: no .png"),
    (["certify", "--booster", "empty", "--output-dir", "out"], 1, "gsb_config.json"),
    (["certify", "--model", "/no/such/model", "--output-dir", "out"], 1, "not a folder"),
    (["certify", "--images", "notimage", "--output-dir", "out"], 1, "cannot be read as an image"),
    (["certify", "--size", "100000", "--output-dir", "out"], 2, "--size"),
    (["attack", "--images", "empty", "--out", "out"], 1, "holds no images"),
    (["attack", "--images", "stems", "--out", "out"], 1, "a.jpg, a.png share a name"),
    (["attack", "--device", "cuda", "--out", "out"], 2, "--device"),
    (["eval", "vqa", "--dataset", "fs-synthetic-heldout", "--split", "bogus", "--output-dir", "out"], 1, "split 'bogus'"),
    (["eval", "vqa", "--model", "./missing-folder", "--output-dir", "out"], 1, "not a folder"),
]


@pytest.mark.parametrize("args, status, needle", FOUND_WHILE_RUNNING)
def test_bad_input_found_while_running_is_one_line_and_leaves_no_folder(args, status, needle, tmp_path, monkeypatch,
                                                                        capsys):
    """Errors that only show once a command runs (a folder's content, a model path, a split) are a one-line
    message and a status, never a traceback, and a failed run leaves no output folder behind. In-process
    through console_main; the test below runs one of them as the installed script."""
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FS_MLLM_TRACEBACK", raising=False)
    proc = console_in_process(args, monkeypatch, capsys)
    got, err = proc.returncode, proc.stderr
    assert got == status and needle in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_input_found_while_running_as_a_user_runs_it(tmp_path):
    args, status, needle = FOUND_WHILE_RUNNING[3]  # a damaged image: found only once the run reads it
    _inputs(tmp_path)
    proc = run_fs_mllm(args, cwd=tmp_path, timeout=300)
    assert proc.returncode == status and needle in proc.stderr, failure(proc)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_16_bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    from PIL import Image

    from fs_mllm.image_io import to_tensor01

    _inputs(tmp_path)
    image = Image.open(tmp_path / "grey16" / "g.png")
    assert image.mode.startswith("I")
    assert to_tensor01(image, 32).mean().item() == pytest.approx(0.5, abs=0.01)  # convert("RGB") alone gave ~1.0

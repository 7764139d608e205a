"""``fs-mllm certify --answers`` (issue 30, item 3): flag logic before any model loads, rows, report, curve, and
resume through the project's results store. Tiny sizes on the embedded fs-mini-llava (n = 10, n0 = 2)."""

import json

import pytest

import fs_mllm.answer_certify
import fs_mllm.models.loading
from fs_mllm.cli import main
from fs_mllm.evaluation.certified_answers import REPORT_RADII, ROWS_FILE, predict_from_counts, read_candidates
from fs_mllm.results import SettingsMismatchError, read_rows

from console_script import failure, run_fs_mllm

pytest.importorskip("onnx")
pytest.importorskip("gguf")

TINY = ["--n", "10", "--n0", "2", "--max-new-tokens", "3"]
SYNTHETIC = ["certify", "--answers", "--dataset", "fs-synthetic-heldout", "--limit", "2", *TINY]


@pytest.fixture
def cached_model(shared_mini_llava):
    """fs-mini-llava loaded once for the session (tests/conftest.py; each run unpatches it at its end)."""
    return lambda model_id, **kwargs: shared_mini_llava


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fs_mllm.models.loading, "load_model", refuse)


def _candidates(tmp_path, text, name="candidates.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("extra, message", [
    (["--n", "9", "--n0", "2"], "n must be an integer >= 10"),
    (["--n", "10"], "n0=100 must be <= n=10"),
    (["--n", "10", "--n0", "2", "--alpha", "0.5"], "alpha must lie in (0, 0.5)"),
    (["--n", "10", "--n0", "0"], "--n0"),
    (["--n", "10", "--n0", "2", "--question", "What?"], "--question goes with --images"),
    (["--n", "10", "--n0", "2", "--variants", "base,fs"], "'base' has no smoothed classifier"),
    (["--n", "10", "--n0", "2", "--variants", "fs,fs"], "must not repeat"),
    (["--n", "10", "--n0", "2", "--variants", "fs", "--booster", "."], "--booster is used by the fs+gsb variant"),
    (["--n", "10", "--n0", "2", "--radii", "0.1"], "--radii applies to feature certification only"),
    (["--n", "10", "--n0", "2", "--dataset", "no-such-set"], "--dataset must be"),
    (["--n", "10", "--n0", "2", "--images", "."], "needs --question"),
])
def test_bad_values_are_usage_errors_before_any_model_loads(extra, message, no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["certify", "--answers", *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_answer_options_need_answers_and_bad_candidate_files_are_usage_errors(tmp_path, no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["certify", "--n0", "3", "--variants", "fs"])
    assert exit_.value.code == 2 and "--n0, --variants apply to certified answers only; add --answers" in capsys.readouterr().err
    for text, message in [("yes\n\nyes\n", "repeats ['yes']"), ("only\n", "at least two"), ("[1, 2]", "JSON list of non-empty"),
                          ('["a", ', "not a JSON list")]:
        with pytest.raises(SystemExit) as exit_:
            main(["certify", "--answers", "--candidates", _candidates(tmp_path, text), *TINY])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert read_candidates(_candidates(tmp_path, " yes \nno\n\n")) == ["yes", "no"]
    assert read_candidates(_candidates(tmp_path, '[" yes", "no"]')) == [" yes", "no"]  # JSON keeps spaces


def test_predict_from_counts_is_cohens_predict():
    assert predict_from_counts({"a": 100}, 0.001) == "a"
    assert predict_from_counts({"a": 10}, 0.001) is None  # 2^-10 = 0.00098 one-sided, two-sided 0.00195 > alpha
    assert predict_from_counts({"a": 60, "b": 40}, 0.001) is None
    assert predict_from_counts({"a": 90, "b": 10, "c": 5}, 0.001) == "a"


def test_interrupted_run_resumes_to_the_rows_of_an_unbroken_run(tmp_path, cached_model, monkeypatch, one_thread):
    monkeypatch.setattr(fs_mllm.models.loading, "load_model", cached_model)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    argv = [*SYNTHETIC, "--variants", "fs", "--no-progress", "--output-dir"]
    summary = main([*argv, str(whole)])
    rows = read_rows(whole / ROWS_FILE)
    assert [row["key"] for row in rows] == [["0", "fs"], ["1", "fs"]]
    for row in rows:
        assert {"answer", "correct", "radius", "p_a_lower", "top_counts", "abstained", "selected", "predict",
                "references"} <= set(row)
        assert sum(row["top_counts"].values()) <= 10 and isinstance(row["correct"], bool)
        assert row["abstained"] == (row["answer"] is None) and (row["radius"] > 0) != row["abstained"]
    table = summary["table"]["rows"][0]
    assert table["variant"] == "FS" and table["questions"] == 2
    assert table["cert acc@0"] == sum(r["correct"] and not r["abstained"] for r in rows) / 2
    assert {f"cert acc@{r:g}" for r in REPORT_RADII} <= set(table) and {"clean acc", "abstained"} <= set(table)
    assert (whole / "certified_accuracy.png").stat().st_size > 1000
    assert "cert acc@0.0625" in (whole / "report.md").read_text()
    assert json.loads((whole / "summary.json").read_text())["table"] == summary["table"]

    real, calls = fs_mllm.answer_certify.certify_answer, []

    def killed_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fs_mllm.answer_certify, "certify_answer", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, str(broken)])
    monkeypatch.setattr(fs_mllm.answer_certify, "certify_answer", real)
    assert len(read_rows(broken / ROWS_FILE)) == 1
    with open(broken / ROWS_FILE, "a", encoding="utf-8") as f:
        f.write('{"abstained": fal')  # the kill came mid-write
    main([*argv, str(broken)])
    assert (broken / ROWS_FILE).read_text() == (whole / ROWS_FILE).read_text()

    monkeypatch.setattr(fs_mllm.models.loading, "load_model", lambda *a, **k: pytest.fail("nothing left to certify"))
    assert main([*argv, str(broken)])["table"] == summary["table"]  # a finished folder: summary only
    assert main([*SYNTHETIC, "--variants", "fs", "--limit", "1", "--no-progress", "--output-dir",
                 str(broken)])["table"]["rows"][0]["questions"] == 1  # --limit selects rows, may change
    with pytest.raises(SettingsMismatchError, match=r"n: stored 10, now 12"):
        main([*SYNTHETIC, "--variants", "fs", "--n", "12", "--output-dir", str(broken)])
    assert (broken / ROWS_FILE).read_text() == (whole / ROWS_FILE).read_text()


def test_image_folder_with_a_closed_set(tmp_path, cached_model, monkeypatch, one_thread):
    from fs_mllm.synthetic import make_dataset

    monkeypatch.setattr(fs_mllm.models.loading, "load_model", cached_model)
    images = tmp_path / "images"
    images.mkdir()
    example = make_dataset(1, split="heldout")[0]
    example.image.save(images / "shapes.png")
    question, answers = example.qa[1]
    out = tmp_path / "out"
    summary = main(["certify", "--answers", "--images", str(images), "--question", question, "--candidates",
                    _candidates(tmp_path, "red\nblue\ngreen\npurple\n"), "--variants", "fs+gsb", "--no-progress",
                    "--n", "10", "--n0", "2", "--output-dir", str(out)])
    (row,) = read_rows(out / ROWS_FILE)
    assert row["key"] == ["shapes.png", "fs+gsb"] and row["references"] is None and row["correct"] is None
    assert set(row["top_counts"]) <= {"red", "blue", "green", "purple"}
    table = summary["table"]["rows"][0]
    assert table["variant"] == "FS+GSB" and "certified@0.25" in table and "clean acc" not in table
    assert json.loads((out / "settings.json").read_text())["candidates"] == ["red", "blue", "green", "purple"]


def test_console_script_certifies_answers(tmp_path):
    """The installed command as a user runs it: exit 0, its files; a bad value is exit 2 with nothing written."""
    out = tmp_path / "answers"
    proc = run_fs_mllm(["certify", "--answers", "--dataset", "fs-synthetic-heldout", "--limit", "1", "--variants",
                        "fs+gsb", *TINY, "--output-dir", str(out)], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, failure(proc)
    assert "cert acc@0.25" in proc.stdout
    for name in (ROWS_FILE, "settings.json", "summary.json", "report.md", "certified_accuracy.png"):
        assert (out / name).is_file(), name
    assert [row["key"] for row in read_rows(out / ROWS_FILE)] == [["0", "fs+gsb"]]

"""Tests for fs_mllm.evaluation: metrics against hand-computed values, the offline eval set, and the
`evaluate` metric modules loading offline."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
from scipy.stats import norm

import datasets
from fs_mllm.evaluation import (
    attack_outcomes,
    attack_success,
    attack_success_rate,
    caption_metrics,
    certified_curve,
    feature_cosine_similarity,
    java_available,
    load_eval_dataset,
    load_metric,
    load_offline_eval,
    metric_module_path,
    normalize_vqa_answer,
    outcome_rate,
    plot_accuracy_vs_budget,
    plot_certified_curve,
    simple_tokenize,
    summary_table,
    targeted_success,
    vqa_accuracy,
    vqa_score,
)
from fs_mllm.evaluation import caption as caption_module

# ----------------------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),          # number words to digits, lower-case
        ("The Ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),      # articles removed
        ("An apple", "apple"),
        ("1,000", "1000"),     # digit-comma-digit: the comma is deleted, not spaced
        ("red,white", "red white"),  # otherwise a comma becomes a space
        ("yes, it is", "yes it is"),  # comma touching a space is deleted
        ("dog.", "dog"),       # trailing period deleted
        ("3.5", "3.5"),        # period followed by a digit kept
        ("dont", "don't"),     # contractions map
        ("isnt", "isn't"),
        ("it's", "it s"),      # official quirk: ' is punctuation and becomes a space
        ("  Yes\n", "yes"),
        ("what?", "what"),
    ],
)
def test_normalize_vqa_answer_official_cases(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def _brute_force_vqa(pred: str, answers: list[str]) -> float:
    """Independent form of the official metric: mean over all (n-1)-subsets of min(#match/3, 1)."""
    n = len(answers)
    accs = [min(1.0, sum(answers[i] == pred for i in subset) / 3.0)
            for subset in itertools.combinations(range(n), n - 1)]
    return sum(accs) / len(accs)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_matching_humans(k: int, expected: float) -> None:
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_score("2", answers) == pytest.approx(expected)
    assert vqa_score("2", answers) == pytest.approx(_brute_force_vqa("2", answers))


def test_vqa_score_normalises_prediction_and_answers() -> None:
    answers = ["two"] * 3 + ["three"] * 7
    assert vqa_score("Two.", answers) == pytest.approx(0.9)
    assert vqa_score("a dog", ["the dog"] * 10) == 1.0
    assert vqa_score("1,000", ["1000"] * 2 + ["100"] * 8) == pytest.approx(0.6)


def test_vqa_score_non_ten_answers_and_single_reference() -> None:
    answers = ["cat", "cat", "dog", "dog", "dog"]
    assert vqa_score("cat", answers) == pytest.approx(_brute_force_vqa("cat", answers))
    assert vqa_score("cat", ["Cat"]) == 1.0
    assert vqa_score("dog", ["cat"]) == 0.0


def test_vqa_accuracy_and_errors() -> None:
    preds = ["2", "yes", "blue"]
    refs = [["2"] * 10, ["no"] * 10, ["blue"] * 2 + ["red"] * 8]
    assert vqa_accuracy(preds, refs) == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    with pytest.raises(ValueError, match="same length"):
        vqa_accuracy(preds, refs[:2])
    with pytest.raises(ValueError, match="predictions"):
        vqa_accuracy([], [])
    with pytest.raises(ValueError, match="answers"):
        vqa_score("2", [])
    with pytest.raises(ValueError, match="answers"):
        vqa_score("2", "2")


# ----------------------------------------------------------------------------- captioning


def test_caption_identical_and_hand_computed_simple_tokenizer() -> None:
    preds = ["a cat sat on the mat", "two dogs run on the grass"]
    refs = [["a cat sat on the mat"], ["two dogs run on the grass"]]
    out = caption_metrics(preds, refs, meteor=False, tokenizer="simple")
    assert out["tokenizer"] == "simple"
    for n in range(1, 5):
        assert out[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert out["ROUGE-L"] == pytest.approx(1.0)
    assert out["CIDEr"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D of a perfect match is 10
    assert out["METEOR"] is None and "meteor=False" in out["skipped"]["METEOR"]
    assert out["SPICE"] is None and "offline" in out["skipped"]["SPICE"]

    # Short candidate: unigram precision 1, brevity penalty exp(1 - 6/3).
    out = caption_metrics(["a cat sat"], [["a cat sat on the mat"]], meteor=False, tokenizer="simple")
    assert out["BLEU-1"] == pytest.approx(math.exp(1 - 6 / 3), rel=1e-6)
    # ROUGE-L: LCS 3, P = 1, R = 0.5, beta = 1.2 -> (1 + b^2) P R / (R + b^2 P)
    b2 = 1.2 ** 2
    assert out["ROUGE-L"] == pytest.approx((1 + b2) * 0.5 / (0.5 + b2))


def test_caption_per_item_cider_zero_for_disjoint_caption() -> None:
    out = caption_metrics(["a red car", "a cat on a mat"], [["a blue sky"], ["a cat on a mat"]],
                          meteor=False, tokenizer="simple", per_item=True)
    assert out["per_item"]["CIDEr"][1] == pytest.approx(10.0, abs=1e-6)
    assert out["per_item"]["CIDEr"][0] < out["per_item"]["CIDEr"][1]


def test_simple_tokenizer_matches_ptb_rules() -> None:
    assert simple_tokenize("A dog's toy, isn't it?") == "a dog 's toy is n't it"
    assert simple_tokenize("It costs 3.5 dollars.") == "it costs 3.5 dollars"


def test_caption_without_java_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_module, "java_available", lambda: False)
    out = caption_metrics(["a cat"], [["a cat"]], meteor=True)
    assert out["tokenizer"] == "simple"
    assert out["METEOR"] is None and "Java" in out["skipped"]["METEOR"]
    with pytest.raises(ValueError, match="tokenizer"):
        caption_metrics(["a cat"], [["a cat"]], tokenizer="ptb")


def test_caption_input_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        caption_metrics(["a"], [["a"], ["b"]], meteor=False)
    with pytest.raises(ValueError, match="predictions"):
        caption_metrics([], [], meteor=False)
    with pytest.raises(ValueError, match=r"references\[0\]"):
        caption_metrics(["a"], [[]], meteor=False)
    with pytest.raises(ValueError, match="tokenizer"):
        caption_metrics(["a"], [["a"]], tokenizer="bpe")


@pytest.mark.skipif(not java_available(), reason="PTBTokenizer needs Java")
def test_caption_ptb_tokenizer_with_java() -> None:
    preds = ["A cat sits on the mat.", "a dog runs"]
    refs = [["A cat sits on the mat.", "a cat is on a mat"], ["Two dogs run."]]
    out = caption_metrics(preds, refs, meteor=False, tokenizer="ptb", per_item=True)
    assert out["tokenizer"] == "ptb"
    assert out["per_item"]["BLEU-4"][0] == pytest.approx(1.0, abs=1e-6)
    # PTB and the pure-Python fallback agree on plain English captions
    simple = caption_metrics(preds, refs, meteor=False, tokenizer="simple")
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert out[key] == pytest.approx(simple[key])


# METEOR starts a 2 GB JVM with paraphrase tables (~10 s): opt in with FS_MLLM_RUN_SLOW=1.
@pytest.mark.skipif(not java_available() or os.environ.get("FS_MLLM_RUN_SLOW") != "1",
                    reason="METEOR needs Java and takes ~10 s; set FS_MLLM_RUN_SLOW=1")
def test_caption_meteor_with_java() -> None:
    out = caption_metrics(["a cat sits on the mat", "a dog runs"],
                          [["a cat sits on the mat"], ["two dogs run in the park"]], meteor=True)
    assert out["METEOR"] is not None and 0.0 < out["METEOR"] < 1.0
    assert "METEOR" not in out["skipped"]
    perfect = caption_metrics(["a cat sits on the mat"], [["a cat sits on the mat"]], meteor=True)
    assert perfect["METEOR"] > out["METEOR"]


# ----------------------------------------------------------------------------- robustness


def test_attack_success_rules() -> None:
    assert targeted_success("The answer is: CAT.", "cat")
    assert not targeted_success("concatenate", "cat")
    assert attack_success_rate(["It is a cat!", "dog"], targets=["cat", "cat"]) == 0.5
    # untargeted with labels: success when the adversarial answer scores 0
    refs = [["2"] * 10, ["yes"] * 10, ["red"] * 10]
    assert attack_success(["two", "no", "blue"], answers_list=refs) == [False, True, True]
    # only questions answered correctly before the attack count
    rate = attack_success_rate(["two", "no", "blue"], answers_list=refs, clean_outputs=["2", "yes", "green"],
                               only_clean_correct=True)
    assert rate == pytest.approx(0.5)
    # untargeted without labels: output changed (after normalisation)
    assert attack_success(["A cat.", "dog"], clean_outputs=["a cat", "cat"]) == [False, True]
    with pytest.raises(ValueError, match="targets"):
        attack_success(["a"], targets=["a", "b"])


def test_attack_outcomes_count_only_what_the_attack_could_win() -> None:
    """A wrong answer staying wrong is no success (it used to count as one), and a variant that answers
    less before the attack must not look easier to attack."""
    refs = [["2"] * 10, ["yes"] * 10, ["red"] * 10, ["cat"] * 10]
    outcomes = attack_outcomes(["two", "no", "blue", "dog"], ["2", "yes", "green", "dog"], answers_list=refs)
    assert outcomes == [False, True, None, None]  # right stayed right; right turned wrong; wrong before: not counted
    assert outcome_rate(outcomes) == 0.5
    assert outcome_rate(attack_outcomes(["dog"], ["dog"], answers_list=[["cat"]])) is None
    targeted = attack_outcomes(["a cat", "a cat", "dog"], ["the cat", "dog", "dog"], targets=["cat"] * 3)
    assert targeted == [None, True, False]  # on target before: not counted
    assert attack_outcomes(["A cat.", "dog"], ["a cat", "cat"]) == [False, True]  # no labels: the output changed
    with pytest.raises(ValueError, match="clean_outputs"):
        attack_outcomes(["a", "b"], ["a"], answers_list=[["a"], ["b"]])
    with pytest.raises(ValueError, match="needs one of"):
        attack_success(["a"])


def test_feature_cosine_similarity() -> None:
    clean = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    adv = np.array([[0.0, 3.0], [-2.0, 0.0], [2.0, 4.0]])
    np.testing.assert_allclose(feature_cosine_similarity(clean, adv, reduction="none"), [0.0, -1.0, 1.0], atol=1e-12)
    assert feature_cosine_similarity(clean, adv) == pytest.approx(0.0)
    torch = pytest.importorskip("torch")
    a = torch.randn(2, 5, 4)
    expected = torch.nn.functional.cosine_similarity(a.flatten(1), (a + 0.3).flatten(1)).mean().item()
    assert feature_cosine_similarity(a, a + 0.3) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        feature_cosine_similarity(clean, adv[:2])


def test_certified_curve_matches_scipy() -> None:
    s_low = np.array([0.99, 0.9, 0.75, 0.55])
    sigma = 0.25
    radii = np.array([0.0, 0.05, 0.125, 0.25, 0.5])
    curve = certified_curve(s_low, sigma, radii=radii, thresholds=(0.0, 0.5, 0.9))
    ref = 2 * norm.cdf(norm.ppf(s_low[:, None]) - radii[None, :] / sigma) - 1
    ref = np.where(ref >= 0, ref, -1.0)
    np.testing.assert_allclose(curve["mean_bound"], ref.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(curve["certified_fraction"]["0.5"], (ref >= 0.5).mean(axis=0))
    np.testing.assert_allclose(curve["certified_fraction"]["0.9"], (ref >= 0.9).mean(axis=0))
    # at radius 0 the bound is 2 S - 1
    np.testing.assert_allclose(curve["mean_bound"][0], np.mean(2 * s_low - 1))
    assert curve["radius"] == radii.tolist() and curve["num_images"] == 4
    json.dumps(curve)
    with pytest.raises(ValueError, match="s_low"):
        certified_curve([], sigma)
    with pytest.raises(ValueError, match="sigma"):
        certified_curve(s_low, 0.0)


def test_plots_write_png(tmp_path) -> None:
    c1 = certified_curve([0.9, 0.8], 0.25, thresholds=(0.5,))
    c2 = certified_curve([0.99, 0.97], 0.25, thresholds=(0.5,))
    p = plot_certified_curve({"FS": c1, "FS+GSB": c2}, tmp_path / "cert.png", threshold=0.5)
    q = plot_accuracy_vs_budget([0.0, 0.5, 1.0], {"base": [0.7, 0.3, 0.1], "FS": [0.6, 0.55, 0.5]},
                                tmp_path / "sub" / "acc.png")
    for path in (p, q):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="threshold"):
        plot_certified_curve(c1, tmp_path / "x.png", threshold=0.7)
    with pytest.raises(ValueError, match="budgets"):
        plot_accuracy_vs_budget([0.0], {"base": [0.1, 0.2]}, tmp_path / "y.png")
    with pytest.raises(ValueError, match="png"):
        plot_accuracy_vs_budget([0.0], {"base": [0.1]}, tmp_path / "y.pdf")


def test_summary_table() -> None:
    md, table = summary_table([{"method": "base", "vqa": 0.5, "asr": np.float32(0.25)},
                               {"method": "FS", "vqa": 0.456789}])
    assert md.splitlines()[0] == "| method | vqa | asr |"
    assert "| FS | 0.4568 | - |" in md
    assert table["rows"][0]["asr"] == 0.25 and table["rows"][1]["asr"] is None
    json.dumps(table)
    with pytest.raises(ValueError, match="rows"):
        summary_table([])


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def offline_vqa() -> datasets.Dataset:
    return load_offline_eval("vqa")


@pytest.fixture(scope="module")
def offline_caption() -> datasets.Dataset:
    return load_offline_eval("caption")


def test_offline_vqa_shape(offline_vqa: datasets.Dataset) -> None:
    ds = offline_vqa
    assert set(ds.column_names) == {"image", "question", "answers", "question_id", "image_id"}
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(set(ds["question_id"])) == len(ds)
    per_image: dict[int, int] = {}
    for iid, answers in zip(ds["image_id"], ds["answers"]):
        assert len(answers) == 10 and all(isinstance(a, str) and a for a in answers)
        per_image[iid] = per_image.get(iid, 0) + 1
    assert len(per_image) >= 12 and min(per_image.values()) >= 3
    img = ds[0]["image"]
    assert img.mode == "RGB" and min(img.size) >= 100


def test_offline_caption_shape_and_distinct_images(offline_caption: datasets.Dataset) -> None:
    ds = offline_caption
    assert set(ds.column_names) == {"image", "captions", "image_id"}
    assert all(len(c) >= 3 for c in ds["captions"])
    sizes_and_means = set()
    for row in ds:
        arr = np.asarray(row["image"])
        assert arr.ndim == 3 and arr.shape[2] == 3
        sizes_and_means.add((arr.shape, round(float(arr.mean()), 3)))
    assert len(sizes_and_means) == len(ds)  # no photo appears twice


def test_load_eval_dataset_default_and_errors() -> None:
    ds = load_eval_dataset("fs-offline-eval", task="caption")
    assert len(ds) >= 12
    with pytest.raises(ValueError, match="task"):
        load_eval_dataset("fs-offline-eval", task="detection")


def test_synthetic_heldout_set_scores_its_own_ground_truth() -> None:
    from fs_mllm.evaluation import load_synthetic_heldout
    from fs_mllm.synthetic import make_example

    vqa = load_eval_dataset("fs-synthetic-heldout", task="vqa")
    caps = load_eval_dataset("fs-synthetic-heldout", task="caption")
    assert len(caps) == 40 and 120 <= len(vqa) <= 160
    first = make_example(0, split="heldout")
    assert caps[0]["captions"] == [first.caption]
    assert np.array_equal(np.asarray(caps[0]["image"]), np.asarray(first.image))
    question, accepted = first.qa[0]
    assert vqa[0]["question"] == question
    # every accepted answer scores 1 under the official rule, a wrong one 0
    assert all(vqa_score(a, vqa[0]["answers"]) == 1.0 for a in accepted)
    assert vqa_score("zebra", vqa[0]["answers"]) == 0.0
    with pytest.raises(ValueError, match="n_images"):
        load_synthetic_heldout("vqa", n_images=0)


def _tiny_images(n: int):
    from PIL import Image

    return [Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)) for i in range(n)]


def test_load_eval_dataset_saved_vqav2_dicts(tmp_path) -> None:
    raw = datasets.Dataset.from_dict({
        "image": _tiny_images(2),
        "question": ["how many?", "what color?"],
        "answers": [[{"answer": "2", "answer_id": 1}] * 10, [{"answer": "red", "answer_id": 1}] * 10],
        "question_id": [11, 12],
        "extra": ["x", "y"],
    }).cast_column("image", datasets.Image())
    raw.save_to_disk(str(tmp_path / "vqa"))
    ds = load_eval_dataset(str(tmp_path / "vqa"), task="vqa")
    assert ds.column_names == ["image", "question", "answers", "question_id", "image_id"]
    assert ds[0]["answers"] == ["2"] * 10 and ds["question_id"] == [11, 12]
    assert vqa_accuracy(["two", "Red"], ds["answers"]) == 1.0
    with pytest.raises(ValueError, match="captions"):
        load_eval_dataset(str(tmp_path / "vqa"), task="caption")


def test_load_eval_dataset_imagefolder_caption(tmp_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, img in enumerate(_tiny_images(3)):
            img.save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": f"a grey square number {i}"}) + "\n")
    ds = load_eval_dataset(str(folder), task="caption")
    assert ds.column_names == ["image", "captions", "image_id"]
    assert sorted(c[0] for c in ds["captions"]) == [f"a grey square number {i}" for i in range(3)]
    assert isinstance(ds.features["image"], datasets.Image)
    with pytest.raises(ValueError, match="question"):
        load_eval_dataset(str(folder), task="vqa")


# ----------------------------------------------------------------------------- evaluate modules


def test_evaluate_modules_load_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    for name in ("vqa_accuracy", "robust_caption"):
        assert os.path.isfile(os.path.join(metric_module_path(name), f"{name}.py"))
    vqa = load_metric("vqa_accuracy")
    assert vqa.compute(predictions=["Two", "dog"], references=[["2"] * 10, ["cat"] * 10]) == {"accuracy": 0.5}
    vqa2 = evaluate.load(metric_module_path("vqa_accuracy"))
    out = vqa2.compute(predictions=["2"], references=[["2"] * 2 + ["3"] * 8], return_scores=True)
    assert out["scores"] == [pytest.approx(0.6)]
    cap = load_metric("robust_caption")
    res = cap.compute(predictions=["a cat on a mat"], references=[["a cat on a mat"]], meteor=False,
                      tokenizer="simple")
    assert res["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and res["METEOR"] is None


def test_the_dataset_names_load_on_first_use_in_a_fresh_process():
    """fs_mllm.evaluation imports Hugging Face datasets only when a dataset name is used (a settings class or a
    command's --help needs none of it); every way of reaching the names works in a fresh interpreter."""
    import subprocess
    import sys

    help_first = (
        "import sys\n"
        "import fs_mllm.cli\n"
        "fs_mllm.cli.build_parser()\n"
        "assert 'datasets' not in sys.modules, 'fs-mllm --help imported datasets'\n"
    )
    code = (
        "import sys\n"
        "import fs_mllm.evaluation as evaluation\n"
        "from fs_mllm.evaluation import datasets, load_eval_dataset, OFFLINE_EVAL_NAME\n"
        "assert datasets is sys.modules['fs_mllm.evaluation.datasets'] and evaluation.datasets is datasets\n"
        "assert load_eval_dataset is datasets.load_eval_dataset and 'load_offline_eval' in dir(evaluation)\n"
        "print(OFFLINE_EVAL_NAME)\n"
    )
    for first in (help_first, "from fs_mllm.evaluation import datasets\n", "import fs_mllm.evaluation.datasets\n"):
        proc = subprocess.run([sys.executable, "-c", first + code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "fs-offline-eval", proc.stderr[-2000:]

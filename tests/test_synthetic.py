"""The synthetic shapes/colours/words task fs-mini-llava is trained and evaluated on (fast, no weights)."""

from __future__ import annotations

import numpy as np
import pytest

from fs_mllm.synthetic import HELDOUT_BACKGROUNDS, TRAIN_BACKGROUNDS, make_dataset, make_example, normalize_answer, vqa_match


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a, b = make_example(3, "heldout", seed=1), make_example(3, "heldout", seed=1)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.qa == b.qa
    assert not set(TRAIN_BACKGROUNDS) & set(HELDOUT_BACKGROUNDS)
    train = make_dataset(20, "train")
    held = make_dataset(20, "heldout")
    assert {e.meta["background"] for e in train} <= set(TRAIN_BACKGROUNDS)
    assert {e.meta["background"] for e in held} <= set(HELDOUT_BACKGROUNDS)
    assert all(e.caption and len(e.qa) >= 3 for e in train + held)
    with pytest.raises(ValueError):
        make_example(0, split="test")


def test_answer_normalisation():
    assert normalize_answer("  The Red.\nmore") == "red"
    assert vqa_match("3", ["three"]) and vqa_match("Three!", ["three", "3"])
    assert not vqa_match("two", ["three", "3"])

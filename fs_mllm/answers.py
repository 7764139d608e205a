"""How the project compares free-text answers: one normalisation, used by the synthetic task's exact
match, the defense table and the eval runner's "answer changed" / "target hit" checks.

The official VQAv2 normalisation (:mod:`fs_mllm.evaluation.vqa`) stays apart on purpose: it
reimplements an external standard, quirks included, so VQAv2 accuracy is comparable with published
numbers; it is used only where that comparability is the point (VQAv2-shaped datasets).
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["normalize_text", "normalize_answer", "answers_match"]

_NON_WORD = re.compile(r"[^\w\s]")
_ARTICLES = ("a", "an", "the")
_NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "0": "zero"}


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace: an answer's surface form should not decide
    whether it changed or hit an attack's target."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def normalize_answer(text: str) -> str:
    """A short answer's key: its first line, :func:`normalize_text`, articles dropped, digits as words
    (so "2", "two" and "Two." match; a model's explanation on later lines is ignored)."""
    first_line = normalize_text(text.strip().split("\n")[0])
    return " ".join(_NUMBER_WORDS.get(w, w) for w in first_line.split() if w not in _ARTICLES)


def answers_match(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match after :func:`normalize_answer` against any accepted answer."""
    key = normalize_answer(prediction)
    return any(key == normalize_answer(a) for a in answers)

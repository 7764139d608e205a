"""VQAv2 accuracy with the official answer normalisation.

Reimplements the behaviour of the official evaluation script (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) so numbers are comparable with published
VQAv2 results:

* normalisation: newlines/tabs to spaces, strip, punctuation handling (a punctuation mark is
  deleted when it touches a space or when the answer contains a digit-comma-digit pattern such as
  ``1,000``; otherwise it becomes a space), periods not followed by a digit are deleted (``3.5`` is
  kept, ``dog.`` becomes ``dog``), lower-casing, number words ``none``/``zero``..``ten`` to digits,
  articles ``a``/``an``/``the`` removed, and the contractions map (``dont`` -> ``don't``).
* score: for each of the n human annotators, ``min(#matches among the other n-1 humans / 3, 1)``;
  the answer's score is the mean over those n leave-one-out subsets (for VQAv2's 10 answers, the
  10-choose-9 subsets). With 10 answers, 1/2/3/4+ matching humans give 0.3/0.6/0.9/1.0.

Documented differences from the official script:

* The official script only punctuation-processes the human answers (and only when they disagree),
  because VQAv2's released answers were normalised at collection time. Our own and third-party
  human answers are not, so both the prediction and the human answers go through the full
  normalisation. On VQAv2 annotations this gives the same results.
* The official contractions table contains curly apostrophes (a typo that makes most entries
  unreachable); we use straight apostrophes, as the EvalAI / lmms-eval ports do.
* Note (same as official): ``'`` is a punctuation mark, so ``it's`` normalises to ``it s`` while the
  apostrophe-less ``dont`` maps to ``don't``.
* With a single human answer there is no leave-one-out subset; the score is then plain exact match
  (1.0 or 0.0) after normalisation.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["normalize_vqa_answer", "vqa_score", "vqa_accuracy", "vqa_scores"]

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Official regex, kept verbatim: "(?!<=\d)" is a (harmless) typo for a look-behind, so in effect
# any period that is not followed by a digit is deleted.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# Official punctuation list (vqaEval.py).
_PUNCT = [";", ":", r"/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`",
          ",", "?"]


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer the way the official VQAv2 evaluation does, so strings compare fairly."""
    if not isinstance(answer, str):
        raise ValueError(f"answer must be a str, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _check_answers(answers: Sequence[str], name: str = "answers") -> list[str]:
    if isinstance(answers, str):
        raise ValueError(f"{name} must be a list of human answers, not a single str")
    answers = list(answers)
    if len(answers) == 0:
        raise ValueError(f"{name} must contain at least one human answer")
    for a in answers:
        if not isinstance(a, str):
            raise ValueError(f"{name} must contain str answers, got {type(a).__name__}")
    return answers


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against its human answers (usually 10).

    Averages ``min(#matches among the other humans / 3, 1)`` over the leave-one-out subsets of
    annotators, which is how VQAv2 turns disagreement between humans into partial credit.
    """
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a str, got {type(prediction).__name__}")
    answers = _check_answers(answers)
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    n_match = sum(g == pred for g in gts)
    total = 0.0
    for g in gts:
        # matches among the other n-1 annotators
        others = n_match - (1 if g == pred else 0)
        total += min(1.0, others / 3.0)
    return total / len(gts)


def vqa_scores(predictions: Sequence[str], answers_list: Sequence[Sequence[str]]) -> list[float]:
    """Per-question official VQA scores (for per-item reporting and bootstrapping)."""
    if isinstance(predictions, str):
        raise ValueError("predictions must be a list of str, not a single str")
    predictions = list(predictions)
    answers_list = list(answers_list)
    if len(predictions) == 0:
        raise ValueError("predictions must not be empty")
    if len(predictions) != len(answers_list):
        raise ValueError(
            f"predictions and answers_list must have the same length, got {len(predictions)} "
            f"and {len(answers_list)}"
        )
    return [vqa_score(p, _check_answers(a, "answers_list[i]")) for p, a in zip(predictions, answers_list)]


def vqa_accuracy(predictions: Sequence[str], answers_list: Sequence[Sequence[str]]) -> float:
    """Mean official VQA accuracy in [0, 1] (multiply by 100 for the usual VQAv2 percentage)."""
    scores = vqa_scores(predictions, answers_list)
    return sum(scores) / len(scores)

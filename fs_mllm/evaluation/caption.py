"""COCO captioning metrics (CIDEr, BLEU-1..4, ROUGE-L, METEOR) through pycocoevalcap.

pycocoevalcap is the reference implementation behind published COCO caption numbers and runs
offline. Tokenisation uses its PTBTokenizer (Stanford CoreNLP, needs Java) when Java works, otherwise
a documented pure-Python approximation (lower-case, split off punctuation, drop the same punctuation
tokens the PTBTokenizer drops); the tokenizer used is reported in the result. METEOR also needs Java
and is skipped with a message when it is absent. SPICE is always skipped: it downloads Stanford
models at first use and cannot run offline.

CIDEr (CIDEr-D as in COCO) takes its IDF weights from the reference set passed in, so it is only
meaningful over a corpus of several images; on a single image every n-gram has IDF 0 and CIDEr is 0.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from typing import Any, Sequence

__all__ = ["caption_metrics", "java_available", "simple_tokenize"]

# Same tokens the pycocoevalcap PTBTokenizer removes after tokenising.
_PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                     ":", "-", "--", "...", ";"}
# Double quotes become `` / '' in PTB and are removed; brackets become -lrb- etc. which, because
# pycocoevalcap lower-cases before the removal, are kept (mimicked below).
_PTB_PUNCTUATIONS |= {'"'}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_SPLIT_RE = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m|\.\.\.|--|\.(?!\d)|,(?!\d)|[!?;:()\[\]{}\"`])", re.IGNORECASE)

SPICE_SKIPPED = "skipped: SPICE downloads Stanford CoreNLP models at first use and does not run offline"


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a working ``java`` is on PATH (PTBTokenizer and METEOR need it)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def simple_tokenize(caption: str) -> str:
    """Pure-Python stand-in for the PTBTokenizer, used only when Java is unavailable.

    Lower-cases, splits punctuation and clitics off words the way PTB does for common English, then
    drops the punctuation tokens the PTBTokenizer drops. Scores can differ slightly from the Java
    tokenizer on unusual text (URLs, abbreviations), which is why the result names the tokenizer.
    """
    text = caption.replace("\n", " ").replace("\t", " ").lower()
    text = _SPLIT_RE.sub(r" \1 ", text)
    tokens = [_BRACKETS.get(t, t) for t in text.split() if t not in _PTB_PUNCTUATIONS]
    return " ".join(tokens)


def _validate(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, str):
        raise ValueError("predictions must be a list of str (one caption per image), not a str")
    predictions = list(predictions)
    references = [list(r) if not isinstance(r, str) else r for r in references]
    if len(predictions) == 0:
        raise ValueError("predictions must not be empty")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} and {len(references)}"
        )
    for i, (p, refs) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise ValueError(f"predictions[{i}] must be a str, got {type(p).__name__}")
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] must be a list of reference captions, not a str")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] must contain at least one reference caption")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must contain only str captions")
    return predictions, references


def _tokenize(predictions: list[str], references: list[list[str]], use_ptb: bool) -> tuple[dict, dict]:
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    if use_ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        def clean(s: str) -> str:
            # PTBTokenizer feeds one caption per line; an embedded newline would shift every caption.
            return s.replace("\n", " ").replace("\r", " ")

        tok = PTBTokenizer()
        gts_t = tok.tokenize({k: [{"caption": clean(c)} for c in v] for k, v in gts.items()})
        res_t = tok.tokenize({k: [{"caption": clean(c)} for c in v] for k, v in res.items()})
        return gts_t, res_t
    return ({k: [simple_tokenize(c) for c in v] for k, v in gts.items()},
            {k: [simple_tokenize(c) for c in v] for k, v in res.items()})


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: bool | None = None,
    tokenizer: str = "auto",
    per_item: bool = False,
) -> dict[str, Any]:
    """Corpus-level COCO caption metrics for one predicted caption per image.

    Args:
        predictions: one generated caption per image.
        references: for each image, its human reference captions.
        meteor: compute METEOR (needs Java, ~10 s JVM start). ``None`` = when Java is available.
        tokenizer: ``"ptb"`` (Java), ``"simple"`` (pure Python) or ``"auto"`` (PTB if Java works).
        per_item: also return per-image CIDEr/BLEU-4/ROUGE-L lists under ``"per_item"``.

    Returns:
        ``{"CIDEr", "BLEU-1".."BLEU-4", "ROUGE-L", "METEOR" (float or None), "SPICE": None,
        "skipped": {metric: reason}, "tokenizer": str, "num_images": int}``; scores in COCO scale
        (BLEU/ROUGE/METEOR in [0, 1], CIDEr in [0, 10]).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predictions, references = _validate(predictions, references)
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    has_java = java_available()
    if tokenizer == "ptb" and not has_java:
        raise ValueError("tokenizer='ptb' needs Java on PATH; use tokenizer='simple' or 'auto'")
    use_ptb = tokenizer == "ptb" or (tokenizer == "auto" and has_java)
    gts, res = _tokenize(predictions, references, use_ptb)

    out: dict[str, Any] = {"tokenizer": "ptb" if use_ptb else "simple", "num_images": len(predictions)}
    skipped: dict[str, str] = {}

    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = float(bleu[n])
    out["ROUGE-L"], rouge_items = Rouge().compute_score(gts, res)
    out["ROUGE-L"] = float(out["ROUGE-L"])
    cider, cider_items = Cider().compute_score(gts, res)
    out["CIDEr"] = float(cider)

    want_meteor = has_java if meteor is None else meteor
    if want_meteor and not has_java:
        skipped["METEOR"] = "skipped: METEOR needs Java (java not found on PATH)"
        out["METEOR"] = None
    elif not want_meteor:
        skipped["METEOR"] = "skipped: disabled by meteor=False" if has_java else \
            "skipped: METEOR needs Java (java not found on PATH)"
        out["METEOR"] = None
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    out["SPICE"] = None
    skipped["SPICE"] = SPICE_SKIPPED
    out["skipped"] = skipped
    if per_item:
        out["per_item"] = {
            "BLEU-4": [float(x) for x in bleu_items[3]],
            "ROUGE-L": [float(x) for x in rouge_items],
            "CIDEr": [float(x) for x in cider_items],
        }
    return out

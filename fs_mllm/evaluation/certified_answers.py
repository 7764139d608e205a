"""``fs-mllm certify --answers``: certified answers (:func:`fs_mllm.certify_answer`) over a question set, resumable.

Why it is built this way: certifying answers costs n0 + n decoder calls per question and variant, so a run
over a dataset takes hours and must survive a kill. It uses the project's results store
(:mod:`fs_mllm.results`), as ``fs-mllm eval`` does: one row per (question, variant) in the
append-only ``answers.jsonl``, written with flush + fsync the moment its certificate exists; a rerun of the
same command skips the keys already written (a torn last line is cut off first); ``settings.json`` records
what decides a row's content, and a rerun with other settings into a folder that holds rows is refused
(only ``variants`` and ``limit`` may change: they select which rows exist, not what a row holds). Each
certificate depends only on the seed and its question's image and prompt (never on which questions ran
before it), so an interrupted run, rerun, ends with the rows of an unbroken run.

What the summary reports, per variant (FS: Gaussian smoothing of the pixels; FS+GSB: with the booster):

* certified accuracy at radius r: the share of questions whose CERTIFY answer is right (answers_match
  against the references) and certified at l2 radius >= r (abstentions count as wrong);
* abstention rate: the share of questions where CERTIFY abstains (p_A lower bound <= 1/2);
* clean accuracy of the smoothed classifier (Cohen et al.'s definition): the share of questions where
  PREDICT returns the right answer, abstentions wrong; PREDICT is run on the n estimation samples' counts
  (two-sided binomial test of the top two answers at level alpha), so it costs no extra model call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fs_mllm.results import ResultsFolder, durable_replace, finite_or_none, folder_kept_only_with_rows

__all__ = ["ROWS_FILE", "REPORT_RADII", "MAY_CHANGE", "read_candidates", "answer_settings", "run_certify_answers",
           "summarize_answers", "predict_from_counts"]

ROWS_FILE = "answers.jsonl"
CURVE_PNG = "certified_accuracy.png"
SUMMARY_JSON = "summary.json"
REPORT_MD = "report.md"
REPORT_RADII = (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0)
MAY_CHANGE = ("variants", "limit")  # they select which rows exist, never what a row holds
VARIANT_LABELS = {"fs": "FS", "fs+gsb": "FS+GSB"}
DEFAULT_OUTPUT_DIR = "fs_mllm_outputs/certify-answers"

DEFINITIONS = (
    "Certified accuracy at r: the share of questions whose certified answer (Cohen et al.'s CERTIFY of the smoothed "
    "classifier g(x) = argmax_c P(answer(x + e) = c), e ~ N(0, sigma^2 I) in [0,1] pixels) is right and certified "
    "at l2 radius >= r; abstentions count as wrong. Each certificate holds with probability >= 1 - alpha over its "
    "sampling noise. Abstained: the share of questions where CERTIFY abstains (p_A lower bound <= 1/2). Clean "
    "accuracy: the share of questions where g's PREDICT (two-sided binomial test of the top two answers among the "
    "n estimation samples, level alpha) returns the right answer; abstentions count as wrong."
)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def read_candidates(path: str) -> list[str]:
    """The closed answer set in ``path``: a JSON list of strings (kept exactly, leading spaces included), or
    one candidate per line (each stripped; blank lines skipped). At least two, none repeated."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the candidates file {path!r} ({error})") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            candidates = json.loads(stripped)
        except ValueError as error:
            raise ValueError(f"candidates file {path!r} starts with '[' but is not a JSON list ({error})") from None
        if not isinstance(candidates, list) or not all(isinstance(c, str) and c.strip() for c in candidates):
            raise ValueError(f"candidates file {path!r} must be a JSON list of non-empty strings")
    else:
        candidates = [line.strip() for line in text.splitlines() if line.strip()]
    if len(candidates) < 2:
        raise ValueError(f"candidates file {path!r} holds {len(candidates)} candidate(s); a closed set needs at least two "
                         "(one per line, or a JSON list)")
    repeated = sorted({c for c in candidates if candidates.count(c) > 1})
    if repeated:
        raise ValueError(f"candidates file {path!r} repeats {repeated}; list each answer once")
    return candidates


def answer_settings(*, model: str, dataset: Optional[str], images: Optional[str], question: Optional[str],
                    candidates: Optional[Sequence[str]], sigma: float, n0: int, n: int, alpha: float, seed: int,
                    batch_size: Optional[int], max_new_tokens: int, booster: Optional[str], variants: Sequence[str],
                    limit: Optional[int]) -> dict[str, Any]:
    """What ``settings.json`` stores: everything that decides a row, plus ``variants``/``limit`` (MAY_CHANGE).
    ``batch_size`` is kept: the noise does not depend on it, but the batched forward's float rounding may."""
    absolute = lambda p: None if p is None else os.path.abspath(p)  # noqa: E731 (a resume from another cwd compares equal)
    return {
        "command": "certify --answers",
        "model": os.path.abspath(model) if os.path.isdir(model) else model,
        "dataset": None if dataset is None else (absolute(dataset) if os.path.isdir(dataset) else dataset),
        "images": absolute(images), "question": question,
        "candidates": None if candidates is None else list(candidates),
        "sigma": float(sigma), "n0": int(n0), "n": int(n), "alpha": float(alpha), "seed": int(seed),
        "batch_size": batch_size, "max_new_tokens": int(max_new_tokens), "booster": absolute(booster),
        "variants": list(variants), "limit": limit,
    }


def _questions(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The question set, in order: dicts with ``id`` and ``fetch() -> (question, references or None, image id,
    PIL image)``."""
    limit = settings["limit"]
    if settings["images"] is not None:
        from PIL import Image

        from fs_mllm.image_io import image_paths

        out = []
        for path in image_paths(settings["images"])[:limit]:
            def fetch(path: Path = path) -> tuple:
                try:
                    image = Image.open(path)
                    image.load()  # decodes now: a truncated file fails here, named
                except OSError as error:
                    raise ValueError(f"--images: {path} cannot be read as an image ({error})") from None
                return settings["question"], None, path.name, image
            out.append({"id": path.name, "fetch": fetch})
        return out
    from fs_mllm.evaluation.datasets import load_eval_dataset

    data = load_eval_dataset(settings["dataset"], task="vqa")
    count = len(data) if limit is None else min(limit, len(data))
    ids = [str(v) for v in data["question_id"][:count]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset {settings['dataset']!r}: question ids are not unique; rows are keyed by them")

    def fetch(i: int) -> tuple:
        row = data[i]  # read on use: the image decodes only for a question still to certify
        return row["question"], list(row["answers"]), row["image_id"], row["image"]

    return [{"id": qid, "fetch": (lambda i=i: fetch(i))} for i, qid in enumerate(ids)]


# ---------------------------------------------------------------------------------------------
# statistics of the rows
# ---------------------------------------------------------------------------------------------

def predict_from_counts(top_counts: Mapping[str, int], alpha: float) -> Optional[str]:
    """Cohen et al.'s PREDICT from answer counts: the top answer when it beats the runner-up in a two-sided
    binomial test at level alpha, else None (abstain)."""
    from scipy.stats import binomtest

    ranked = sorted(top_counts.items(), key=lambda item: -item[1])  # stable: most_common order among ties
    if not ranked or ranked[0][1] == 0:
        return None
    (answer, count_a), count_b = ranked[0], (ranked[1][1] if len(ranked) > 1 else 0)
    return answer if binomtest(count_a, count_a + count_b, 0.5).pvalue <= alpha else None


def _row(item: dict[str, Any], variant: str, cert: Any, question: str, references: Optional[list[str]],
         image_id: Any, alpha: float) -> dict[str, Any]:
    from fs_mllm.answers import answers_match

    judge = (lambda answer: None if references is None else (answer is not None and answers_match(answer, references)))
    predicted = predict_from_counts(cert.top_counts, alpha)
    return {
        "question_id": item["id"], "variant": variant, "question": question,
        "image_id": image_id, "references": references,
        "answer": cert.answer, "correct": judge(cert.answer), "selected": cert.selected,
        "selected_correct": judge(cert.selected), "radius": finite_or_none(float(cert.radius)),
        "p_a_lower": finite_or_none(float(cert.p_a_lower)), "top_counts": {str(k): int(v) for k, v in cert.top_counts.items()},
        "abstained": bool(cert.abstained), "predict": predicted, "predict_correct": judge(predicted),
        "decoder_forwards": cert.extra.get("decoder_forwards"),
    }


def _certified(row: Mapping[str, Any], radius: float, need_correct: bool) -> bool:
    return (not row["abstained"] and (row["radius"] or 0.0) >= radius
            and (bool(row["correct"]) if need_correct else True))


def summarize_answers(rows_by_key: Mapping[tuple, Mapping[str, Any]], ids: Sequence[str], settings: Mapping[str, Any],
                      out_dir: Path) -> dict[str, Any]:
    """Table (REPORT_RADII), curve PNG, summary.json and report.md of the rows of ``ids`` x variants."""
    import numpy as np

    from fs_mllm.evaluation.robustness import _check_out_path, _new_figure, summary_table

    variants = settings["variants"]
    per_variant = {v: [rows_by_key[(i, v)] for i in ids if (i, v) in rows_by_key] for v in variants}
    has_refs = all(r["references"] is not None for rows in per_variant.values() for r in rows)
    measure = "cert acc" if has_refs else "certified"
    top = max([r["radius"] or 0.0 for rows in per_variant.values() for r in rows] + [1.0])
    grid = np.linspace(0.0, top * 1.05, 211)
    table_rows, curves = [], {}
    for variant, rows in per_variant.items():
        label = VARIANT_LABELS.get(variant, variant)
        count = len(rows)
        share = (lambda flags: None if count == 0 else float(sum(flags)) / count)
        entry: dict[str, Any] = {"variant": label, "questions": count}
        if has_refs:
            entry["clean acc"] = share(bool(r["predict_correct"]) for r in rows)
        entry["abstained"] = share(r["abstained"] for r in rows)
        for radius in REPORT_RADII:
            entry[f"{measure}@{radius:g}"] = share(_certified(r, radius, has_refs) for r in rows)
        table_rows.append(entry)
        curves[label] = {"radius": grid.tolist(),
                         "value": [share(_certified(r, float(x), has_refs) for r in rows) for x in grid]}
    markdown, table = summary_table(table_rows)

    path = _check_out_path(out_dir / CURVE_PNG)
    fig, axes = _new_figure(1)
    ax = axes[0, 0]
    for label, curve in curves.items():
        if curve["value"] and curve["value"][0] is not None:
            ax.step(curve["radius"], curve["value"], where="post", label=label)
    ax.set_xlabel("l2 radius (pixel space [0,1])")
    ax.set_ylabel("certified accuracy" if has_refs else "share certified (any answer)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{settings['model']}: sigma={settings['sigma']:g}, n={settings['n']}, alpha={settings['alpha']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)

    definitions = DEFINITIONS if has_refs else (
        DEFINITIONS + " These questions have no reference answers, so the table reports the share certified at "
                      "radius >= r whatever the answer ('certified@r') instead of certified accuracy.")
    summary = {"settings": dict(settings), "table": table, "curves": curves, "radii": list(REPORT_RADII),
               "definitions": definitions, "markdown": markdown}
    _write(out_dir / SUMMARY_JSON, json.dumps(summary, indent=2, allow_nan=False))
    source = settings["dataset"] or f"{settings['images']} ({settings['question']!r})"
    closed = "open set (greedy answers)" if settings["candidates"] is None else f"closed set of {len(settings['candidates'])} candidates"
    _write(out_dir / REPORT_MD, "\n\n".join([
        f"# Certified answers of {settings['model']}",
        f"{source}; {closed}; sigma={settings['sigma']:g}, n0={settings['n0']}, n={settings['n']}, "
        f"alpha={settings['alpha']:g}, seed={settings['seed']}.",
        markdown.rstrip("\n"), f"![certified accuracy]({CURVE_PNG})", definitions]) + "\n")
    return summary


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    durable_replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def run_certify_answers(settings: Mapping[str, Any], output_dir: str | os.PathLike, *, progress: bool = True,
                        load: Any = None) -> dict[str, Any]:
    """Run (or resume) ``fs-mllm certify --answers`` into ``output_dir``; returns the summary.

    ``settings`` is :func:`answer_settings`' dict (checked by the command line); ``load(model) -> (model,
    processor)`` replaces :func:`fs_mllm.models.loading.load_model` (tests). The model loads only when a row
    is missing."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {str(out)!r} exists and is not a folder")
    settings = dict(settings)
    with folder_kept_only_with_rows(out, ROWS_FILE):
        results = ResultsFolder(out, settings, rows_file=ROWS_FILE, may_change=MAY_CHANGE, label="--output-dir",
                                fix="use a new --output-dir or rerun with the original settings")
        model = None
        try:
            items = _questions(settings)
            if not items:
                raise ValueError("no questions to certify")
            todo = [(variant, item) for variant in settings["variants"] for item in items
                    if (item["id"], variant) not in results.done]
            if todo:
                model = _certify(settings, todo, results, progress, load)
        finally:
            results.close()
            if model is not None:
                from fs_mllm.patching import unpatch_model

                unpatch_model(model)
        return summarize_answers(results.done, [item["id"] for item in items], settings, out)


def _certify(settings: Mapping[str, Any], todo: list, results: ResultsFolder, progress: bool, load: Any) -> Any:
    from tqdm.auto import tqdm

    from fs_mllm.answer_certify import certify_answer
    from fs_mllm.config import FSConfig
    from fs_mllm.defense import apply_variant
    from fs_mllm.evaluation.runner import build_prompt_for
    from fs_mllm.image_io import rgb

    if load is None:
        from fs_mllm.models.loading import load_model as load
    booster = None
    if any(variant == "fs+gsb" for variant, _ in todo):
        from fs_mllm.booster.model import GaussianSmoothnessBooster

        booster = GaussianSmoothnessBooster.from_pretrained(settings["booster"]).eval()
    model, processor = load(settings["model"])
    config = FSConfig(sigma=settings["sigma"], alpha=settings["alpha"], seed=settings["seed"])
    device = next(p.device for p in model.parameters())
    current = None
    bar = tqdm(todo, desc="certifying answers", unit="answer", disable=not progress)
    for variant, item in bar:
        if variant != current:
            apply_variant(model, variant, config, processor, booster)
            current = variant
            bar.set_description(f"certifying answers [{VARIANT_LABELS.get(variant, variant)}]")
        question, references, image_id, image = item["fetch"]()
        prompt = build_prompt_for(processor, question, settings["model"])
        inputs = processor(images=rgb(image), text=prompt, return_tensors="pt")
        inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in dict(inputs).items()}
        cert = certify_answer(model, inputs, candidates=settings["candidates"], sigma=settings["sigma"],
                              n0=settings["n0"], n=settings["n"], alpha=settings["alpha"],
                              batch_size=settings["batch_size"], seed=settings["seed"], processor=processor,
                              max_new_tokens=settings["max_new_tokens"])[0]
        results.put((item["id"], variant), _row(item, variant, cert, question, references, image_id, settings["alpha"]))
    return model


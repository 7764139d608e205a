"""``fs-mllm certify``: certify the features feeding the decoder (FCSB per image, curve, report) or, with
``--answers``, the smoothed model's answers (fs_mllm.evaluation.certified_answers, resumable). The options, their
checks across options (usage errors before any model loads), and the runs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

from ..arguments import _argtype, add_fs_config_arguments, existing_folder, image_size, positive_int, radii, sample_count
from ..config import DEFAULT_ANSWER_N0, DEFAULT_ANSWER_TOKENS, DEFAULT_CERTIFY_N, DEFAULT_NORMALIZE
from ..image_io import image_paths, processor_size, to_tensor01
from ..models.loading import DEFAULT_MODEL, load_model


def certify_images(model, images01, sigma: float, n: int, alpha: float, method: str, booster=None, processor=None,
                   seed: int = 0, chunk_size: Optional[int] = None, normalize: str = DEFAULT_NORMALIZE):
    """Certificates of the features feeding the decoder of ``model`` smoothed at ``sigma`` (booster optional)."""
    from ..certify import certify_model
    from ..patching import is_patched, patch_model, unpatch_model

    was_patched = is_patched(model)
    if not was_patched:
        patch_model(model, sigma=sigma, booster=booster, processor=processor)
    try:
        return certify_model(model, images01, n=n, alpha=alpha, method=method, seed=seed, chunk_size=chunk_size,
                             normalize=normalize)
    finally:
        if not was_patched:
            unpatch_model(model)


def run_certify(args: argparse.Namespace) -> dict:
    """Certify every image, then write the results (nothing is written when a step fails); --answers: certify
    the answers (:func:`run_certify_answers`)."""
    if args.answers:
        return run_certify_answers(args)
    import torch
    from tqdm.auto import tqdm

    from ..evaluation import certified_curve, plot_certified_curve, summary_table

    booster = load_booster(args.booster)  # the cheap checks first: a bad booster or image costs no model load
    from ..evaluation.datasets import read_images
    from ..results import write_report

    pictures, names = read_images(args.images, args.limit)
    model, processor = load_model(args.model)
    size = args.size or processor_size(processor)
    if not size:
        raise ValueError("could not read the input resolution from the processor; pass --size")
    images = torch.stack([to_tensor01(picture, size) for picture in pictures])
    certificates = []
    for i in tqdm(range(len(names)), desc="certifying", unit="image"):
        certificates += certify_images(model, images[i:i + 1], args.sigma, args.n, args.alpha, args.method, booster, processor,
                                       args.seed, args.chunk_size, args.normalize)
    records, rows = [], []
    for name, cert in zip(names, certificates):
        fcsb = {r: float(cert.fcsb(r)) for r in args.radii}
        records.append({"image": name, **{k: v for k, v in cert.to_dict().items() if not k.startswith("token_")},
                        **{f"fcsb@{r:g}": b for r, b in fcsb.items()}})
        rows.append({"image": name, "S mean": cert.score_mean, "S lower": cert.score_lower,
                     **{f"FCSB@{r:g}": b for r, b in fcsb.items()}})
    curve = certified_curve([c.score_lower for c in certificates], args.sigma)
    markdown, table = summary_table(rows)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    certificates_path = out_dir / "certificates.jsonl"
    tmp = out_dir / "certificates.jsonl.tmp"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    os.replace(tmp, certificates_path)
    plot = plot_certified_curve({"FS" if booster is None else "FS+GSB": curve}, out_dir / "certified_curve.png", threshold=0.5,
                                title=f"{args.model}, sigma={args.sigma}, n={args.n}, alpha={args.alpha}")
    settings = {key: value for key, value in vars(args).items() if not callable(value)}  # not argparse's dispatch function
    (out_dir / "summary.json").write_text(json.dumps({"settings": settings, "table": table, "curve": curve}, indent=2, default=str))
    write_report(out_dir, f"Certified features of {args.model}", markdown, [f"![certified curve]({Path(plot).name})",
                 CERTIFICATE_MEANING.format(sigma=args.sigma, alpha=args.alpha)])
    print(markdown)
    print(f"\nwrote {certificates_path}, certified_curve.png, report.md")
    return {"certificates": certificates, "curve": curve}


CERTIFICATE_MEANING = (
    "Each FCSB@r is a lower bound on cos(F(x'), F(x)) for every x' within l2 distance r of the image "
    "(in [0,1] pixel space), for the exact smoothed encoder F at sigma={sigma}; it holds per image with "
    "probability >= 1 - {alpha} over the certification noise. -1 means no guarantee."
)


# ---------------------------------------------------------------------------------------------
# certify --answers
# ---------------------------------------------------------------------------------------------

ANSWERS_OUTPUT_DIR = "fs_mllm_outputs/certify-answers"
FEATURES_OUTPUT_DIR = "fs_mllm_outputs/certify"
# the built-in question sets (fs_mllm.evaluation.datasets; spelled here so `fs-mllm --help` need not import datasets)
OFFLINE_EVAL_NAME, SYNTHETIC_EVAL_NAME = "fs-offline-eval", "fs-synthetic-heldout"
ANSWER_ONLY = ("dataset", "question", "candidates", "n0", "batch_size", "max_new_tokens", "variants")
FEATURE_ONLY = ("size", "radii", "method", "chunk_size", "normalize")

CERTIFY_DESCRIPTION = """Certify a model on a folder of images (default: the real offline photos).

Without --answers: certify the smoothed image features feeding the decoder (FCSB curve, report).

With --answers: certify the smoothed model's answers (fs_mllm.certify_answer, Cohen et al.'s CERTIFY):
per question and variant (FS, FS+GSB) the certified answer, its l2 radius in [0,1] pixel space, the
p_A lower bound, the top answer counts, whether it abstained, and whether the answer is right against
the references. Writes answers.jsonl (append-only rows), settings.json, certified_accuracy.png,
summary.json and report.md (certified accuracy at r = 0, 0.0625, 0.125, 0.25, 0.5, 1.0, abstention
rate, clean accuracy of the smoothed classifier). Stop it and rerun the same command to resume; a
rerun with other settings into a folder that holds rows is refused (--variants and --limit may change).

    fs-mllm certify --answers --dataset fs-synthetic-heldout --limit 50 --n 1000 --sigma 0.25
    fs-mllm certify --answers --images photos/ --question "What is shown?" --candidates answers.txt
"""


def _candidates_file(text: str) -> list:
    from ..evaluation.certified_answers import read_candidates

    return read_candidates(text)


candidates_file = _argtype(_candidates_file, "candidates_file")


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name) != parser.get_default(name)


def check_certify_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks of ``fs-mllm certify`` that span options: a bad combination is a usage error (exit 2), before
    any model loads. With --answers, fills in the answer defaults and ``args.answer_settings``."""
    option = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if not args.answers:
        given = [option(name) for name in ANSWER_ONLY if _given(parser, args, name)]
        if given:
            parser.error(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to certified answers only; add --answers")
        args.output_dir = args.output_dir or FEATURES_OUTPUT_DIR
        return
    given = [option(name) for name in FEATURE_ONLY if _given(parser, args, name)]
    if given:
        parser.error(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to feature certification only, "
                     "not to --answers")
    from ..answer_certify import check_counts
    from ..defense import check_variants

    args.n0 = DEFAULT_ANSWER_N0 if args.n0 is None else args.n0
    args.max_new_tokens = DEFAULT_ANSWER_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    args.output_dir = args.output_dir or ANSWERS_OUTPUT_DIR
    try:
        args.n0, args.n, args.alpha = check_counts(args.n0, args.n, args.alpha)
    except ValueError as error:
        parser.error(f"--answers: {error}")
    if args.images is not None:
        if args.dataset is not None:
            parser.error("--images and --dataset are two question sources; give one")
        if args.question is None or not args.question.strip():
            parser.error("--answers --images needs --question (the question asked about every image)")
        try:
            image_paths(args.images)
        except ValueError as error:
            parser.error(str(error))
    else:
        if args.question is not None:
            parser.error("--question goes with --images (a dataset brings its own questions)")
        args.dataset = args.dataset or OFFLINE_EVAL_NAME
        if args.dataset not in (OFFLINE_EVAL_NAME, SYNTHETIC_EVAL_NAME) and not os.path.isdir(args.dataset):
            parser.error(f"--dataset must be {OFFLINE_EVAL_NAME!r}, {SYNTHETIC_EVAL_NAME!r} or a local dataset folder, "
                         f"got {args.dataset!r}")
    try:
        variants = check_variants("fs,fs+gsb" if args.variants is None else args.variants)
    except ValueError as error:
        parser.error(f"--{error}")
    if "base" in variants:
        parser.error("--variants: 'base' has no smoothed classifier to certify; use fs and/or fs+gsb")
    booster = args.booster
    if booster is None:
        from ..evaluation.settings import _default_booster

        try:  # the booster fs+gsb would use, stored even when this run has no fs+gsb (so adding it later resumes)
            booster = _default_booster(args.model)
        except ValueError as error:
            if "fs+gsb" in variants:
                parser.error(f"--booster: {error}")
            booster = None
    elif "fs+gsb" not in variants:
        parser.error("--booster is used by the fs+gsb variant; add it to --variants")
    from ..evaluation.certified_answers import answer_settings

    args.answer_settings = answer_settings(
        model=args.model, dataset=args.dataset if args.images is None else None, images=args.images,
        question=args.question, candidates=args.candidates, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
        seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, booster=booster,
        variants=variants, limit=args.limit)


def run_certify_answers(args: argparse.Namespace) -> dict:
    """``fs-mllm certify --answers``: run or resume, print the table; returns the summary."""
    from ..evaluation.certified_answers import run_certify_answers as run

    summary = run(args.answer_settings, args.output_dir, progress=not args.no_progress)
    print(summary["markdown"])
    print(f"\nwrote {Path(args.output_dir) / 'answers.jsonl'}, certified_accuracy.png, report.md, summary.json")
    return summary


def load_booster(path: Optional[str]):
    if path is None:
        return None
    from ..gsb import GaussianSmoothnessBooster

    return GaussianSmoothnessBooster.from_pretrained(path)




def add_arguments(cert: argparse.ArgumentParser) -> None:
    """The options of ``fs-mllm certify`` (features, and with --answers the answers)."""
    cert.add_argument("--answers", action="store_true",
                      help="certify the answers of the smoothed model (Cohen et al.'s CERTIFY, fs_mllm.certify_answer), "
                           "one row per question and variant, resumable; without it: certify the features (FCSB)")
    cert.add_argument("--model", default=DEFAULT_MODEL, help=f"model id or local folder (default {DEFAULT_MODEL})")
    cert.add_argument("--images", type=existing_folder, default=None, help="folder of images (default: the project's real offline photos)")
    cert.add_argument("--dataset", default=None,
                      help=f"--answers: question set, {OFFLINE_EVAL_NAME!r} (the offline photos' questions, the default), "
                           f"{SYNTHETIC_EVAL_NAME!r} (fs-mini-llava's held-out task) or a local dataset folder")
    cert.add_argument("--question", default=None, help="--answers with --images: the question asked about every image")
    cert.add_argument("--candidates", type=candidates_file, default=None, metavar="FILE",
                      help="--answers: closed answer set, one candidate per line (stripped) or a JSON list of strings; "
                           "default: open set (greedy answers, normalised)")
    cert.add_argument("--limit", type=positive_int, default=None, help="certify only the first N images (--answers: questions)")
    cert.add_argument("--size", type=image_size, default=None, help="input resolution (default: the processor's)")
    cert.add_argument("--n", type=sample_count, default=DEFAULT_CERTIFY_N,
                      help="Monte-Carlo samples per image (default 1000, at least 2; --answers: estimation samples, at least 10)")
    cert.add_argument("--n0", type=positive_int, default=None,
                      help=f"--answers: selection samples per question (default {DEFAULT_ANSWER_N0}, at most --n)")
    add_fs_config_arguments(cert, ("sigma", "alpha", "method", "seed", "chunk_size", "normalize"))
    cert.add_argument("--batch-size", type=positive_int, default=None,
                      help="--answers: noisy copies per decoder call (default 32)")
    cert.add_argument("--max-new-tokens", type=positive_int, default=None,
                      help=f"--answers, open set: tokens greedily decoded per noisy copy (default {DEFAULT_ANSWER_TOKENS})")
    cert.add_argument("--variants", default=None,
                      help="--answers: comma list of fs, fs+gsb (default fs,fs+gsb; fs+gsb uses --booster, by default "
                           "fs-mini-llava's shipped booster)")
    cert.add_argument("--radii", type=radii, default=[0.0625, 0.125, 0.25],
                      help="comma-separated l2 radii to report FCSB at (default 0.0625,0.125,0.25)")
    cert.add_argument("--booster", type=existing_folder, default=None, help="folder of a trained GaussianSmoothnessBooster (gsb.safetensors)")
    cert.add_argument("--no-progress", action="store_true", help="--answers: no progress bar")
    cert.add_argument("--output-dir", default=None,
                      help=f"where results go (default fs_mllm_outputs/certify; --answers: {ANSWERS_OUTPUT_DIR}, rerun "
                           "the same command to resume)")

"""``fs-mllm certify``: certify the features feeding the decoder (FCSB per image, curve, report) or, with
``--answers``, the smoothed model's answers (fs_mllm.evaluation.certified_answers, resumable). The options, their
checks across options (usage errors before any model loads), and the runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..arguments import (_argtype, add_fs_config_arguments, dataclass_from_args, existing_folder, image_size, positive_int,
                         radii, sample_count, settings_or_usage_error)
from ..config import CertifyConfig
from ..evaluation.certified_features import DEFAULT_OUTPUT_DIR as FEATURES_OUTPUT_DIR
from ..evaluation.certified_features import DEFAULT_RADII, FeatureCertifySettings, run_certify_features
from ..image_io import image_paths
from ..models.loading import DEFAULT_MODEL


def run_certify(args: argparse.Namespace) -> dict:
    """Certify the features (:func:`fs_mllm.evaluation.certified_features.run_certify_features`) and print the
    table; --answers: certify the answers (:func:`run_certify_answers`)."""
    if args.answers:
        return run_certify_answers(args)
    result = run_certify_features(args.feature_settings, args.output_dir, progress=not args.no_progress)
    print(result["markdown"])
    print(f"\nwrote {Path(args.output_dir) / 'certificates.jsonl'}, certified_curve.png, report.md")
    return result


# ---------------------------------------------------------------------------------------------
# certify --answers
# ---------------------------------------------------------------------------------------------

ANSWERS_OUTPUT_DIR = "fs_mllm_outputs/certify-answers"
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
        args.feature_settings = settings_or_usage_error(parser, lambda: dataclass_from_args(FeatureCertifySettings, args))
        return
    given = [option(name) for name in FEATURE_ONLY if _given(parser, args, name)]
    if given:
        parser.error(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to feature certification only, "
                     "not to --answers")
    from ..answer_certify import check_counts
    from ..defense import check_variants

    args.n0 = CertifyConfig.n0 if args.n0 is None else args.n0
    args.max_new_tokens = CertifyConfig.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
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
    cert.add_argument("--n", type=sample_count, default=CertifyConfig.n,
                      help=f"Monte-Carlo samples per image (default {CertifyConfig.n}, at least 2; --answers: estimation samples, "
                           "at least 10)")
    cert.add_argument("--n0", type=positive_int, default=None,
                      help=f"--answers: selection samples per question (default {CertifyConfig.n0}, at most --n)")
    add_fs_config_arguments(cert, ("sigma", "alpha", "method", "seed", "chunk_size", "normalize"))
    cert.add_argument("--batch-size", type=positive_int, default=None,
                      help="--answers: noisy copies per decoder call (default 32)")
    cert.add_argument("--max-new-tokens", type=positive_int, default=None,
                      help=f"--answers, open set: tokens greedily decoded per noisy copy (default {CertifyConfig.max_new_tokens})")
    cert.add_argument("--variants", default=None,
                      help="--answers: comma list of fs, fs+gsb (default fs,fs+gsb; fs+gsb uses --booster, by default "
                           "fs-mini-llava's shipped booster)")
    cert.add_argument("--radii", type=radii, default=DEFAULT_RADII,
                      help=f"comma-separated l2 radii to report FCSB at (default {','.join(map(str, DEFAULT_RADII))})")
    cert.add_argument("--booster", type=existing_folder, default=None, help="folder of a trained GaussianSmoothnessBooster (gsb.safetensors)")
    cert.add_argument("--no-progress", action="store_true", help="no progress bar")
    cert.add_argument("--output-dir", default=None,
                      help=f"where results go (default fs_mllm_outputs/certify; --answers: {ANSWERS_OUTPUT_DIR}, rerun "
                           "the same command to resume)")

"""``fs-mllm eval vqa|caption`` (and recipes/eval_vqa.py, recipes/eval_caption.py): the command line of
the robustness evaluation, parsed into an :class:`~fs_mllm.evaluation.settings.EvalSettings` and run by
:func:`fs_mllm.evaluation.runner.run_eval`, the same call a Python user makes."""

from __future__ import annotations

import argparse
import os
from typing import Any, Iterable, Optional

from ..arguments import (add_crop_view_arguments, add_fs_config_arguments, fraction_pair, fs_config_from_args,
                         non_negative_int, positive_float, positive_int, probability, settings_or_usage_error)
from ..attacks import NORMS, OBJECTIVES, PROTOCOLS
from ..config import ATTACK_STEPS, FSConfig
from ..evaluation.runner import run_eval
from ..evaluation.settings import ANSWER_TOKENS, TASKS, EvalSettings
from ..evaluation.summary import SUMMARY_JSON, SUMMARY_MD


def _description(task: str, title: str, example: str, tail: str) -> str:
    """``--help`` text of one eval task: what it runs out of the box, how it resumes, then ``tail``."""
    return f"""{title}

Runs out of the box on the embedded offline model and eval set:

    fs-mllm eval {task} --output-dir runs/{task} {example}
    accelerate launch --num_processes 2 recipes/eval_{task}.py --output-dir runs/{task} ...   # sharded

Stop it (Ctrl-C, a kill) and rerun the same command to resume (results.rank*.jsonl are append-only; a
rerun with other settings into a folder that holds results is refused, and so is a second run writing
to the same folder at once). {tail}
"""


EVAL_DESCRIPTIONS = {
    "vqa": _description(
        "vqa", "VQA robustness evaluation: base vs FS vs FS+GSB, clean and under attack, with certified FCSB curves.",
        "--limit 8 --attack-eps 0.5 1.0 --certify-n 100",
        "Outputs: summary.md, summary.json, certified_curve.png, accuracy_vs_budget.png."),
    "caption": _description(
        "caption", "Captioning robustness evaluation (CIDEr, BLEU-4, ROUGE-L): base vs FS vs FS+GSB, clean and attacked.",
        "--limit 8 --attack-eps 0.5 --certify-n 100",
        "Caption metrics are corpus-level (CIDEr's IDF comes from the reference\n"
        "set), so they are computed over the whole set at summary time, with the pure-Python tokenizer and\n"
        "without METEOR (no JVM start)."),
}


def build_parser(task: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of one eval task, its ``--help`` the task's description."""
    parser = argparse.ArgumentParser(prog=prog, description=EVAL_DESCRIPTIONS[task],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, task)
    return parser


def add_common_arguments(parser: Any, task: str) -> None:
    """The eval command line (``fs-mllm eval vqa|caption``, recipes/eval_vqa.py, recipes/eval_caption.py).

    Numbers are checked by their argparse ``type`` (exit 2 with usage before anything loads)."""
    parser.add_argument("--model", default=EvalSettings.model,
                        help="'fs-mini-llava' (embedded offline LLaVA) or a model id / local folder")
    parser.add_argument("--dataset", default=EvalSettings.dataset, help="'fs-offline-eval' (real photos), 'fs-synthetic-heldout' (fs-mini-llava's own task), a local folder or a Hub id")
    parser.add_argument("--split", default=EvalSettings.split)
    parser.add_argument("--variants", default=",".join(EvalSettings.variants), help="comma list of base, fs, fs+gsb")
    add_fs_config_arguments(parser, ("sigma", "n_samples", "seed"))
    parser.add_argument("--booster", default=None,
                        help="GaussianSmoothnessBooster folder (for fs+gsb; default for fs-mini-llava: its shipped booster)")
    parser.add_argument("--attack-norm", default=EvalSettings.attack_norm, choices=NORMS)
    parser.add_argument("--attack-eps", type=positive_float, nargs="*", default=[],
                        help="attack budgets (several for accuracy vs budget); none = clean only")
    parser.add_argument("--attack-steps", type=positive_int, default=EvalSettings.attack_steps,
                        help=f"PGD steps (default {EvalSettings.attack_steps}; the benchmark's adaptive attack runs {ATTACK_STEPS})")
    parser.add_argument("--attack-step-size", type=positive_float, default=None, help="default 2.5 * eps / steps")
    parser.add_argument("--objective", default=EvalSettings.objective, choices=OBJECTIVES,
                        help="feature_target pulls the features towards the next example's image (AttackVLM)")
    parser.add_argument("--protocol", default=EvalSettings.protocol, choices=PROTOCOLS,
                        help="adaptive: through each variant's smoothed path (EOT); transfer: the paper's protocol, "
                             "crafted once on the undefended model and replayed on every variant")
    parser.add_argument("--crop-scale", type=fraction_pair, default=None,
                        help="M-Attack random local crops: 'lo,hi' area fractions (e.g. 0.5,1), default none")
    add_crop_view_arguments(parser, EvalSettings.crop_views)
    parser.add_argument("--target", default=None, help="target text for --objective targeted")
    parser.add_argument("--eot-samples", type=positive_int, default=EvalSettings.eot_samples,
                        help="noisy forwards averaged per attack gradient on FS variants (fresh noise every step)")
    parser.add_argument("--certify-n", type=non_negative_int, default=EvalSettings.certify_n,
                        help="noise samples to certify each image (0 = off, else >= 2)")
    parser.add_argument("--certify-alpha", type=probability, default=FSConfig.alpha,
                        help="failure probability of each certificate (the FS variants' FSConfig.alpha)")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N examples only")
    parser.add_argument("--max-new-tokens", type=positive_int, default=ANSWER_TOKENS[task])
    parser.add_argument("--dtype", default=EvalSettings.dtype, choices=("float32", "float16", "bfloat16"))
    if task == "caption":
        parser.add_argument("--prompt", default=EvalSettings.caption_prompt, help="caption instruction")
    parser.add_argument("--output-dir", required=True, help="results folder; rerun the same command to resume")
    parser.add_argument("--no-progress", action="store_true")


def settings_from_args(args: Any, task: str) -> EvalSettings:
    """EvalSettings from the parsed command-line arguments."""
    kwargs = dict(
        task=task, model=args.model, dataset=args.dataset, split=args.split, variants=args.variants,
        fs=fs_config_from_args(args).replace(alpha=args.certify_alpha), booster=args.booster,
        attack_norm=args.attack_norm, attack_eps=tuple(args.attack_eps or ()), attack_steps=args.attack_steps,
        attack_step_size=args.attack_step_size, objective=args.objective, target=args.target,
        protocol=args.protocol, crop_scale=args.crop_scale, crop_views=args.crop_views,
        crop_full_view=args.crop_full_view, eot_samples=args.eot_samples,
        certify_n=args.certify_n, max_new_tokens=args.max_new_tokens,
        limit=args.limit, dtype=args.dtype,
    )
    if task == "caption":
        kwargs["caption_prompt"] = args.prompt
    return EvalSettings(**kwargs)


def main(task: str, argv: Optional[Iterable[str]] = None, prog: Optional[str] = None) -> int:
    """``fs-mllm eval vqa|caption`` and the eval recipes: parse ``argv`` (default ``sys.argv[1:]``), run
    or resume, print the summary table. Every setting is checked before anything is loaded."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    parser = build_parser(task, prog)
    args = parser.parse_args(None if argv is None else list(argv))
    settings = settings_or_usage_error(parser, lambda: settings_from_args(args, task))
    summary = run_eval(settings, args.output_dir, progress=not args.no_progress)
    if summary is not None:
        print(summary["markdown"])
        print(f"results: {args.output_dir} ({SUMMARY_MD}, {SUMMARY_JSON}"
              + "".join(f", {os.path.basename(p)}" for p in summary["plots"].values()) + ")")
    return 0

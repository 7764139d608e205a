"""``fs-mllm demo``: what the defense buys on the embedded offline model, under both threat models.

Base / FS / FS+GSB on fs-mini-llava's own held-out task, clean; under the paper's transfer protocol
(targeted feature matching at linf 16/255, crafted once on the undefended model and replayed) beside
random sign noise of the same size (the control an attack's success is read against); and under the
adaptive white-box attack at an l2 budget inside the certified radius and one far beyond it.
Sized to run in a few minutes on a 2-core CPU, so its figures come from few questions (the report says
how many); ``benchmarks/bench_defense.py`` is the full-size table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")

TRANSFER_MEANING = (
    "**Transfer** (the paper's protocol: AttackVLM / M-Attack style): each image is pushed, once, towards the "
    "vision features of another image by PGD on the *undefended* model, then the same adversarial image is shown "
    "to every variant; base attack success shows that the attack works, and the drop on FS/FS+GSB is what "
    "smoothing buys against attackers who do not model the defense."
)
NOISE_MEANING = (
    "**Noise** (a control, not an attack): the same images moved by random +-eps signs at the transfer budget. "
    "A smoothed variant draws its noise from the image's own pixels, so any change to the image brings a fresh "
    "Monte-Carlo draw and some answers flip with no adversary at all; an attack achieves only its success above this row."
)
ADAPTIVE_MEANING = (
    "**Adaptive** (white-box against the defense): PGD through each variant's own smoothed path, with the "
    "gradient averaged over fresh noise draws (EOT); the certificate promises only that the smoothed "
    "decoder-facing features keep cosine >= the certified FCSB within the certified l2 radius (per image, "
    "with probability >= 1 - alpha) -- it does not promise that answers stay right, and nothing beyond that radius."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .arguments import add_fs_config_arguments, positive_float, positive_int, sample_count

    add_fs_config_arguments(parser, ("sigma", "n_samples", "alpha"))
    parser.add_argument("--examples", type=positive_int, default=4,
                        help="held-out synthetic images attacked (one question each; default 4)")
    parser.add_argument("--clean-images", type=positive_int, default=6,
                        help="held-out synthetic images whose every question measures clean accuracy (default 6)")
    parser.add_argument("--certify-n", type=sample_count, default=100, help="Monte-Carlo samples per certificate (default 100)")
    parser.add_argument("--transfer-steps", type=positive_int, default=60, help="PGD steps crafting the transfer images (default 60)")
    parser.add_argument("--eps-far", type=positive_float, default=1.0, help="adaptive l2 budget far beyond the certified radius (default 1.0)")
    parser.add_argument("--steps", type=positive_int, default=2, help="adaptive PGD steps (default 2; the benchmark uses 20)")
    parser.add_argument("--eot-samples", type=positive_int, default=2, help="noisy forwards per adaptive gradient (default 2; the benchmark uses 8)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=6, help="answer length (default 6)")
    parser.add_argument("--output-dir", default="fs_mllm_outputs/demo", help="where the report and plots go")


def settings_from_args(args: argparse.Namespace):
    """DefenseSettings for the demo (validated before any model is loaded)."""
    from .arguments import fs_config_from_args
    from .defense import DefenseSettings

    return DefenseSettings(
        fs=fs_config_from_args(args), transfer_linf=(16 / 255,), transfer_steps=args.transfer_steps,
        transfer_step_size=2 / 255, crop_scale=None, adaptive_l2=(args.sigma / 4, args.eps_far), adaptive_linf=(),
        adaptive_steps=args.steps, eot_samples=args.eot_samples, certify_images=args.examples,
        certify_n=args.certify_n, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
    )


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Base / FS / FS+GSB on fs-mini-llava: clean, the noise control, transfer (paper's protocol) and adaptive,
    with certificates."""
    import torch

    from .cli import processor_size, write_report
    from .defense import defense_table, evaluate_defense, synthetic_items
    from .evaluation import plot_accuracy_vs_budget
    from .gsb import GaussianSmoothnessBooster
    from .models.loading import DEFAULT_MODEL, load_model
    from .models.mini_llava import BOOSTER_DIR, build_prompt

    settings = settings_from_args(args)
    torch.manual_seed(0)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(DEFAULT_MODEL)
    booster = GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR).eval()
    size = processor_size(processor)
    clean_items = synthetic_items(args.clean_images, size, build_prompt)
    attack_items = synthetic_items(args.examples, size, build_prompt, first_question_only=True)
    rows = evaluate_defense(model, processor, clean_items, attack_items, settings, booster=booster)
    markdown = defense_table(rows)
    adaptive = [r for r in rows if r["protocol"] == "adaptive"]
    budgets = sorted({r["eps"] for r in adaptive})
    accuracy = {v: [next(r["accuracy"] for r in rows if r["variant"] == v and r["protocol"] == "clean")]
                + [next(r["accuracy"] for r in adaptive if r["variant"] == v and r["eps"] == e) for e in budgets]
                for v in settings.variants}
    plot_accuracy_vs_budget([0.0, *budgets], accuracy, out_dir / "accuracy_vs_budget.png",
                            title="fs-mini-llava, adaptive l2 attack, held-out synthetic questions")
    (out_dir / "summary.json").write_text(json.dumps({"settings": settings.to_dict(), "rows": rows}, indent=2), encoding="utf-8")
    notes = [
        f"Model: fs-mini-llava (real DINOv2 ViT-S/14 + SmolLM2-135M-Instruct, projector trained by the project), "
        f"sigma={settings.fs.sigma}, n0={settings.fs.n_samples}; FS+GSB uses the shipped booster. Clean accuracy on "
        f"{len(clean_items)} held-out synthetic questions; attacks on {len(attack_items)} images (one question each): "
        "few questions, so one answer moves these figures by several points (benchmarks/bench_defense.py is the full table).",
        TRANSFER_MEANING + f" Here: linf 16/255, {settings.transfer_steps} steps, target = the next held-out image; "
        "targeted success = the answer became the variant's own answer for the target image.",
        NOISE_MEANING,
        ADAPTIVE_MEANING + f" Here: untargeted on the answer, l2 {budgets[0]:g} (inside the certified radius where the "
        f"certified FCSB column is above -1) and l2 {budgets[-1]:g} (far beyond it), {settings.adaptive_steps} steps, "
        f"EOT {settings.eot_samples}.",
        f"Certified FCSB: mean over the {len(attack_items)} attacked images of the bound at the budget's l2 radius "
        f"(n={settings.certify_n}, alpha={settings.alpha}; an linf ball of radius e lies in the l2 ball of radius "
        "e*sqrt(3*H*W), far beyond any certified radius, hence -1 there; -1 = no guarantee).",
        "![accuracy vs budget](accuracy_vs_budget.png)",
    ]
    write_report(out_dir, "fs-mllm demo: what the defense buys, under both threat models", markdown, notes)
    print(markdown)
    print(f"\nwrote {out_dir}/report.md, accuracy_vs_budget.png, summary.json")
    return {"rows": rows}

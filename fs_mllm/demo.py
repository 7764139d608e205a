"""``fs-mllm demo``: what the defense buys on the embedded offline model, under both threat models.

Base / FS / FS+GSB on fs-mini-llava's own held-out task, clean; under the paper's transfer protocol
(targeted feature matching at linf 16/255, crafted once on the undefended model and replayed) beside
random sign noise of the same size (the control an attack's success is read against); and under the
adaptive white-box attack at an l2 budget inside the certified radius and one far beyond it.
The transfer images are crafted once by the project (``fs_mllm/data/demo_transfer``: the one table's linf
16/255 protocol, its command and fingerprints in its README) and replayed, and so are the adaptive attack's
images on the first of them (``fs_mllm/data/demo_adaptive``, crafted through each variant's own smoothed
path with the demo's settings), so the time goes to answering more images. Every figure is printed beside
its count (``benchmarks/bench_defense.py`` is the full-size table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .config import ATTACK_EOT_SAMPLES, ATTACK_STEPS, DEFENSE_ANSWER_TOKENS, DEMO_ATTACK_STEPS, DEMO_CERTIFY_N, DEMO_EOT_SAMPLES

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


SHIPPED_TRANSFER = Path(__file__).resolve().parent / "data" / "demo_transfer"
"""The demo's pre-crafted transfer images: a ``benchmarks/bench_defense.py`` checkpoint (settings.json and the
images), replayed through :func:`fs_mllm.defense.evaluate_defense`'s ``transfer_images`` check."""
SHIPPED_EXAMPLES = 32  # attacked images in SHIPPED_TRANSFER: the demo's default --examples
SHIPPED_TRANSFER_STEPS = 300
SHIPPED_ADAPTIVE = Path(__file__).resolve().parent / "data" / "demo_adaptive"
"""The demo's pre-crafted adaptive images (:func:`make_shipped_adaptive`): replayed through
:func:`fs_mllm.defense.evaluate_defense`'s ``adaptive_images`` check (the smoothing, the attack's settings, the
booster), so any other setting attacks live."""
SHIPPED_ADAPTIVE_EXAMPLES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .arguments import add_fs_config_arguments, positive_float, positive_int, sample_count

    add_fs_config_arguments(parser, ("sigma", "n_samples", "alpha"))
    parser.add_argument("--examples", type=positive_int, default=SHIPPED_EXAMPLES,
                        help=f"held-out synthetic images attacked by transfer and shown the noise control, one question "
                             f"each (default {SHIPPED_EXAMPLES}: the shipped transfer images; another count crafts them)")
    parser.add_argument("--adaptive-examples", type=positive_int, default=None,
                        help=f"the first of them attacked by the adaptive attack, and certified (default "
                             f"{SHIPPED_ADAPTIVE_EXAMPLES}, or --examples if fewer: {SHIPPED_ADAPTIVE_EXAMPLES} replays the "
                             "shipped adaptive images; other settings attack live)")
    parser.add_argument("--certify-n", type=sample_count, default=DEMO_CERTIFY_N,
                        help=f"Monte-Carlo samples per certificate, on the adaptive examples (default {DEMO_CERTIFY_N})")
    parser.add_argument("--transfer-steps", type=positive_int, default=SHIPPED_TRANSFER_STEPS,
                        help=f"PGD steps crafting the transfer images (default {SHIPPED_TRANSFER_STEPS}, the shipped "
                             "images; another count crafts them)")
    parser.add_argument("--eps-far", type=positive_float, default=1.0, help="adaptive l2 budget far beyond the certified radius (default 1.0)")
    parser.add_argument("--steps", type=positive_int, default=DEMO_ATTACK_STEPS,
                        help=f"adaptive PGD steps (default {DEMO_ATTACK_STEPS}; the benchmark uses {ATTACK_STEPS})")
    parser.add_argument("--eot-samples", type=positive_int, default=DEMO_EOT_SAMPLES,
                        help=f"noisy forwards per adaptive gradient (default {DEMO_EOT_SAMPLES}; the benchmark uses {ATTACK_EOT_SAMPLES})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFENSE_ANSWER_TOKENS,
                        help=f"answer length (default {DEFENSE_ANSWER_TOKENS})")
    parser.add_argument("--output-dir", default="fs_mllm_outputs/demo", help="where the report and plots go")


def settings_from_args(args: argparse.Namespace):
    """The demo's DefenseSettings (validated before any model is loaded): clean accuracy, the noise control and
    transfer on every example (crafted as the shipped images were: the one table's linf 16/255 protocol); the
    adaptive attack, and the certificates, on the first ``--adaptive-examples``."""
    from .arguments import fs_config_from_args
    from .defense import DefenseSettings

    if args.adaptive_examples is not None and args.adaptive_examples > args.examples:
        raise ValueError(f"--adaptive-examples {args.adaptive_examples} is more than --examples {args.examples}; "
                         "attack at most every example")
    count = adaptive_count(args)
    return DefenseSettings(fs=fs_config_from_args(args), alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                           certify_n=args.certify_n, transfer_linf=(16 / 255,), transfer_steps=args.transfer_steps,
                           transfer_step_size=1 / 255, crop_scale=(0.5, 1.0), crop_views=2, crop_full_view=True,
                           adaptive_l2=(args.sigma / 4, args.eps_far), adaptive_linf=(), adaptive_steps=args.steps,
                           eot_samples=args.eot_samples, adaptive_examples=count, certify_images=count)


def adaptive_count(args: argparse.Namespace) -> int:
    """``--adaptive-examples``, or by default the shipped count (or every example, if fewer)."""
    return min(SHIPPED_ADAPTIVE_EXAMPLES, args.examples) if args.adaptive_examples is None else args.adaptive_examples


def uses_shipped_transfer(args: argparse.Namespace) -> bool:
    return args.examples == SHIPPED_EXAMPLES and args.transfer_steps == SHIPPED_TRANSFER_STEPS


def default_args() -> argparse.Namespace:
    """The default demo's options (what the shipped images were crafted with)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([])


# the demo's options the shipped adaptive images were crafted with, at their defaults (the replay checks the
# rest: model, items, smoothing, attack settings, booster)
_SHIPPED_ADAPTIVE_ARGS = ("examples", "transfer_steps", "adaptive_examples", "sigma", "n_samples", "alpha", "steps",
                          "eot_samples", "eps_far")


def uses_shipped_adaptive(args: argparse.Namespace) -> bool:
    """Whether the demo runs with the options the shipped adaptive images were crafted with (else it attacks live)."""
    defaults = default_args()
    return SHIPPED_ADAPTIVE.is_dir() and adaptive_count(args) == SHIPPED_ADAPTIVE_EXAMPLES and all(
        getattr(args, k) == getattr(defaults, k) for k in _SHIPPED_ADAPTIVE_ARGS if k != "adaptive_examples")


def variant_name(variant: str) -> str:
    return {"base": "base", "fs": "FS", "fs+gsb": "FS+GSB"}[variant]


def readings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per protocol and budget: each variant's right answers before and after, and what it means."""
    from .defense import budget_label

    lines = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["norm"], row["eps"]), []).append(row)
    for (protocol, norm, eps), group in groups.items():
        by = {r["variant"]: r for r in group}
        if protocol == "clean":
            counts = ", ".join(f"{variant_name(v)} {r['right_after']}/{r['n']}" for v, r in by.items())
            lines.append(f"clean ({group[0]['n']} questions): right answers {counts}.")
            continue
        counts = ", ".join(f"{variant_name(v)} {r['right_before']} -> {r['right_after']}" for v, r in by.items())
        base, best = by.get("base"), max(group, key=lambda r: r["accuracy"])
        verdict = ""
        if base is not None and best["variant"] != "base" and best["accuracy"] > base["accuracy"]:
            verdict = f"; {variant_name(best['variant'])} keeps the most"
        elif base is not None:
            verdict = "; no smoothed variant keeps more than base here"
        what = {"transfer": "crafted once on base, replayed", "noise": "the control: random signs, no attacker",
                "adaptive": "through each variant's own smoothed path"}[protocol]
        lines.append(f"{protocol} {budget_label(protocol, norm, eps)} ({what}; {group[0]['n']} images), right before -> "
                     f"after: {counts}{verdict}.")
    return lines


def certified_reading(rows: list[dict[str, Any]]) -> list[str]:
    """The certificates as a user can read them: at each certified radius, the mean FCSB over the images that
    have a guarantee, and how many have one."""
    lines = []
    for row in rows:
        if row["variant"] == "base" or row["protocol"] not in ("clean", "adaptive") or row.get("certified_share") is None:
            continue
        total = row["certified_images"]
        have = round(row["certified_share"] * total)
        where = f"within l2 {row['certified_radius_l2']:g} of the clean image"
        if have:
            lines.append(f"{variant_name(row['variant'])} certified, {where}: the smoothed features keep cosine >= "
                         f"{row['certified_fcsb_guaranteed']:.3f} (mean) to the clean ones for {have} of {total} images.")
        else:
            lines.append(f"{variant_name(row['variant'])} certified, {where}: no guarantee for any of {total} images.")
    return list(dict.fromkeys(lines))  # the clean row and an adaptive row at the same radius say the same


def _load(args: argparse.Namespace):
    """The embedded model, its booster and the demo's items: every example's first question (clean accuracy,
    transfer, the noise control; the first ``--adaptive-examples`` also adaptive and certified)."""
    from .image_io import processor_size
    from .defense import synthetic_items
    from .gsb import GaussianSmoothnessBooster
    from .models.loading import DEFAULT_MODEL, load_model
    from .models.mini_llava import BOOSTER_DIR, build_prompt

    model, processor = load_model(DEFAULT_MODEL)
    booster = GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR).eval()
    size = processor_size(processor)
    if size is None:
        raise ValueError(f"the demo's processor states no square input size ({type(processor).__name__}); the demo "
                         "runs on fs-mini-llava's own processor")
    items = synthetic_items(args.examples, size, build_prompt, first_question_only=True)
    return model, processor, booster, items


def make_shipped_adaptive(folder: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Craft the demo's adaptive images (the default demo's settings, every variant, transfer replayed from the
    shipped images) into the checkpoint ``folder``, keeping each adaptive batch: its ``settings.json`` and
    ``adaptive_*.safetensors`` are what ``fs_mllm/data/demo_adaptive`` ships (``recipes/make_demo_adaptive.py``)."""
    import torch

    from .defense import evaluate_defense

    args = default_args()

    torch.manual_seed(0)
    model, processor, booster, items = _load(args)
    return evaluate_defense(model, processor, items, items, settings_from_args(args), booster=booster, progress=progress,
                            checkpoint=folder, transfer_images=SHIPPED_TRANSFER, keep_adaptive_images=True)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Base / FS / FS+GSB on fs-mini-llava: clean, the noise control, transfer (paper's protocol, replayed) and
    adaptive (replayed at the default settings), with certificates; prints the table, the counts and one
    reading per protocol."""
    import torch

    from .results import write_report
    from .defense import defense_table, evaluate_defense
    from .evaluation import plot_accuracy_vs_budget

    settings = settings_from_args(args)
    torch.manual_seed(0)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor, booster, items = _load(args)
    shipped, shipped_adaptive = uses_shipped_transfer(args), uses_shipped_adaptive(args)
    rows = evaluate_defense(model, processor, items, items, settings, booster=booster,
                            transfer_images=SHIPPED_TRANSFER if shipped else None,
                            adaptive_images=SHIPPED_ADAPTIVE if shipped_adaptive else None)
    markdown = defense_table(rows)
    adaptive = [r for r in rows if r["protocol"] == "adaptive"]
    budgets = sorted({r["eps"] for r in adaptive})
    accuracy = {v: [next(r["accuracy"] for r in rows if r["variant"] == v and r["protocol"] == "clean")]
                + [next(r["accuracy"] for r in adaptive if r["variant"] == v and r["eps"] == e) for e in budgets]
                for v in settings.variants}
    plot_accuracy_vs_budget([0.0, *budgets], accuracy, out_dir / "accuracy_vs_budget.png",
                            title="fs-mini-llava, adaptive l2 attack, held-out synthetic questions")
    summary_settings = {"defense": settings.to_dict(), "transfer_images": "shipped" if shipped else "crafted",
                        "adaptive_images": "shipped" if shipped_adaptive else "crafted", "examples": args.examples,
                        "adaptive_examples": adaptive_count(args), "clean_questions": len(items)}
    (out_dir / "summary.json").write_text(json.dumps({"settings": summary_settings, "rows": rows}, indent=2), encoding="utf-8")
    lines = readings(rows)
    certificates = certified_reading(rows)
    notes = [
        f"Model: fs-mini-llava (real DINOv2 ViT-S/14 + SmolLM2-135M-Instruct, projector trained by the project), "
        f"sigma={args.sigma}, n0={args.n_samples}; FS+GSB uses the shipped booster. {args.examples} held-out synthetic "
        f"images, one question each: clean accuracy, transfer and the noise control on all of them, the adaptive "
        f"attack on the first {adaptive_count(args)}: each row's n is its count, and one answer moves a row of n "
        "by 1/n (benchmarks/bench_defense.py is the full table).",
        TRANSFER_MEANING + f" Here: linf 16/255, {args.transfer_steps} steps of 1/255, whole view + one random crop "
        "(scale 0.5-1) per step, target = the next held-out image; targeted success = the answer became the "
        "variant's own answer for the target image. " + ("The images are the shipped ones (fs_mllm/data/demo_transfer, "
                                                         "crafted by the project's own code; see its README)."
                                                         if shipped else "The images were crafted in this run."),
        NOISE_MEANING,
        ADAPTIVE_MEANING + f" Here: untargeted on the answer, l2 {budgets[0]:g} (inside the certified radius where the "
        f"certified column names images with a guarantee) and l2 {budgets[-1]:g} (far beyond it), "
        f"{args.steps} steps, EOT {args.eot_samples}. " + (
            "The images are the shipped ones (fs_mllm/data/demo_adaptive: crafted by the project's own code through "
            "each variant's own smoothed path with these settings, checked to fit before they are replayed; see its README)."
            if shipped_adaptive else "The images were crafted in this run."),
        f"Certified FCSB (n={args.certify_n}, alpha={args.alpha}, on the {adaptive_count(args)} adaptive images): the "
        "mean over the images that have a guarantee at the row's l2 radius, and how many have one (an linf ball of "
        "radius e lies only in the l2 ball of radius e*sqrt(3*H*W), far beyond any certified radius: none there).",
        "Reading:\n\n" + "\n".join(f"- {line}" for line in lines + certificates),
        "![accuracy vs budget](accuracy_vs_budget.png)",
    ]
    write_report(out_dir, "fs-mllm demo: what the defense buys, under both threat models", markdown, notes)
    print(markdown)
    print()
    for line in lines + certificates:
        print(line)
    print(f"\nCounts: {len(items)} questions (clean, transfer, noise), {adaptive_count(args)} adaptive images; "
          f"full-size figures: docs/results.md.")
    print(f"wrote {out_dir}/report.md, accuracy_vs_budget.png, summary.json")
    return {"rows": rows}

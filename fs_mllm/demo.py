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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .config import (DEFENSE_ANSWER_TOKENS, DEMO_ATTACK_STEPS, DEMO_CERTIFY_N, DEMO_EOT_SAMPLES, DEMO_FAR_L2, FSConfig)

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
_FS_DEFAULTS = FSConfig()


@dataclass
class DemoSettings:
    """The demo's settings: the smoothing, how many images, the attacks' strength, where the report goes.

    The defaults are what the shipped images were crafted with (``fs-mllm demo`` with no options), so the demo
    replays them; any other ``examples`` or ``transfer_steps`` crafts the transfer images, and any other
    setting the adaptive images depend on attacks live. Checked on construction (a ValueError naming the field).
    """

    sigma: float = _FS_DEFAULTS.sigma
    n_samples: int = _FS_DEFAULTS.n_samples
    alpha: float = _FS_DEFAULTS.alpha
    examples: int = SHIPPED_EXAMPLES  # held-out images: clean accuracy, transfer and the noise control on each
    adaptive_examples: Optional[int] = None  # the first this many also attacked adaptively and certified (None: the shipped count)
    certify_n: int = DEMO_CERTIFY_N
    transfer_steps: int = SHIPPED_TRANSFER_STEPS
    eps_far: float = DEMO_FAR_L2  # the adaptive l2 budget far beyond the certified radius
    steps: int = DEMO_ATTACK_STEPS
    eot_samples: int = DEMO_EOT_SAMPLES
    max_new_tokens: int = DEFENSE_ANSWER_TOKENS
    output_dir: Union[str, os.PathLike] = "fs_mllm_outputs/demo"

    def __post_init__(self) -> None:
        from .arguments import check_float, check_int
        from .config import check_alpha, check_n, check_sigma

        self.sigma = check_sigma(self.sigma)
        check_n(self.n_samples, "n_samples", minimum=1)
        self.alpha = check_alpha(self.alpha)
        check_n(self.certify_n, "certify_n")
        for name in ("examples", "transfer_steps", "steps", "eot_samples", "max_new_tokens"):
            check_int(getattr(self, name), name)
        self.eps_far = check_float(self.eps_far, "eps_far")
        if self.adaptive_examples is not None:
            check_int(self.adaptive_examples, "adaptive_examples")
            if self.adaptive_examples > self.examples:
                raise ValueError(f"adaptive_examples {self.adaptive_examples} is more than examples {self.examples}; "
                                 "attack at most every example")
        self.output_dir = os.fspath(self.output_dir)


def defense_settings(demo: DemoSettings):
    """The demo's DefenseSettings: clean accuracy, the noise control and transfer on every example (crafted as
    the shipped images were: the one table's linf 16/255 protocol); the adaptive attack, and the certificates,
    on the first ``adaptive_examples``."""
    from .defense import DefenseSettings

    count = adaptive_count(demo)
    return DefenseSettings(fs=FSConfig(sigma=demo.sigma, n_samples=demo.n_samples, alpha=demo.alpha),
                           max_new_tokens=demo.max_new_tokens, certify_n=demo.certify_n, transfer_linf=(16 / 255,),
                           transfer_steps=demo.transfer_steps, transfer_step_size=1 / 255, crop_scale=(0.5, 1.0),
                           crop_views=2, crop_full_view=True, adaptive_l2=(demo.sigma / 4, demo.eps_far), adaptive_linf=(),
                           adaptive_steps=demo.steps, eot_samples=demo.eot_samples, adaptive_examples=count,
                           certify_images=count)


def adaptive_count(demo: DemoSettings) -> int:
    """``adaptive_examples``, or by default the shipped count (or every example, if fewer)."""
    return min(SHIPPED_ADAPTIVE_EXAMPLES, demo.examples) if demo.adaptive_examples is None else demo.adaptive_examples


def uses_shipped_transfer(demo: DemoSettings) -> bool:
    return demo.examples == SHIPPED_EXAMPLES and demo.transfer_steps == SHIPPED_TRANSFER_STEPS


# the demo's settings the shipped adaptive images were crafted with, at their defaults (the replay checks the
# rest: model, items, smoothing, attack settings, booster)
_SHIPPED_ADAPTIVE_FIELDS = ("examples", "transfer_steps", "adaptive_examples", "sigma", "n_samples", "alpha", "steps",
                          "eot_samples", "eps_far")


def uses_shipped_adaptive(demo: DemoSettings) -> bool:
    """Whether the demo runs with the settings the shipped adaptive images were crafted with (else it attacks live)."""
    defaults = DemoSettings()
    return SHIPPED_ADAPTIVE.is_dir() and adaptive_count(demo) == SHIPPED_ADAPTIVE_EXAMPLES and all(
        getattr(demo, k) == getattr(defaults, k) for k in _SHIPPED_ADAPTIVE_FIELDS if k != "adaptive_examples")


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


def _load(demo: DemoSettings):
    """The embedded model, its booster and the demo's items: every example's first question (clean accuracy,
    transfer, the noise control; the first ``--adaptive-examples`` also adaptive and certified)."""
    from .image_io import processor_size
    from .defense import synthetic_items
    from .booster.model import GaussianSmoothnessBooster
    from .models.loading import DEFAULT_MODEL, load_model
    from .models.mini_llava import BOOSTER_DIR, build_prompt

    model, processor = load_model(DEFAULT_MODEL)
    booster = GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR).eval()
    size = processor_size(processor)
    if size is None:
        raise ValueError(f"the demo's processor states no square input size ({type(processor).__name__}); the demo "
                         "runs on fs-mini-llava's own processor")
    items = synthetic_items(demo.examples, size, build_prompt, first_question_only=True)
    return model, processor, booster, items


def make_shipped_adaptive(folder: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Craft the demo's adaptive images (the default demo's settings, every variant, transfer replayed from the
    shipped images) into the checkpoint ``folder``, keeping each adaptive batch: its ``settings.json`` and
    ``adaptive_*.safetensors`` are what ``fs_mllm/data/demo_adaptive`` ships (``recipes/make_demo_adaptive.py``)."""
    import torch

    from .defense import evaluate_defense

    demo = DemoSettings()

    torch.manual_seed(0)
    model, processor, booster, items = _load(demo)
    return evaluate_defense(model, processor, items, items, defense_settings(demo), booster=booster, progress=progress,
                            checkpoint=folder, transfer_images=SHIPPED_TRANSFER, keep_adaptive_images=True)


def run_demo(demo: Optional[DemoSettings] = None) -> dict[str, Any]:
    """Base / FS / FS+GSB on fs-mini-llava: clean, the noise control, transfer (paper's protocol, replayed) and
    adaptive (replayed at the default settings), with certificates; prints the table, the counts and one
    reading per protocol."""
    import torch

    from .results import write_report
    from .defense import defense_table, evaluate_defense
    from .evaluation import plot_accuracy_vs_budget

    demo = DemoSettings() if demo is None else demo
    settings = defense_settings(demo)
    torch.manual_seed(0)
    out_dir = Path(demo.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor, booster, items = _load(demo)
    shipped, shipped_adaptive = uses_shipped_transfer(demo), uses_shipped_adaptive(demo)
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
                        "adaptive_images": "shipped" if shipped_adaptive else "crafted", "examples": demo.examples,
                        "adaptive_examples": adaptive_count(demo), "clean_questions": len(items)}
    (out_dir / "summary.json").write_text(json.dumps({"settings": summary_settings, "rows": rows}, indent=2), encoding="utf-8")
    lines = readings(rows)
    certificates = certified_reading(rows)
    notes = [
        f"Model: fs-mini-llava (real DINOv2 ViT-S/14 + SmolLM2-135M-Instruct, projector trained by the project), "
        f"sigma={demo.sigma}, n0={demo.n_samples}; FS+GSB uses the shipped booster. {demo.examples} held-out synthetic "
        f"images, one question each: clean accuracy, transfer and the noise control on all of them, the adaptive "
        f"attack on the first {adaptive_count(demo)}: each row's n is its count, and one answer moves a row of n "
        "by 1/n (benchmarks/bench_defense.py is the full table).",
        TRANSFER_MEANING + f" Here: linf 16/255, {demo.transfer_steps} steps of 1/255, whole view + one random crop "
        "(scale 0.5-1) per step, target = the next held-out image; targeted success = the answer became the "
        "variant's own answer for the target image. " + ("The images are the shipped ones (fs_mllm/data/demo_transfer, "
                                                         "crafted by the project's own code; see its README)."
                                                         if shipped else "The images were crafted in this run."),
        NOISE_MEANING,
        ADAPTIVE_MEANING + f" Here: untargeted on the answer, l2 {budgets[0]:g} (inside the certified radius where the "
        f"certified column names images with a guarantee) and l2 {budgets[-1]:g} (far beyond it), "
        f"{demo.steps} steps, EOT {demo.eot_samples}. " + (
            "The images are the shipped ones (fs_mllm/data/demo_adaptive: crafted by the project's own code through "
            "each variant's own smoothed path with these settings, checked to fit before they are replayed; see its README)."
            if shipped_adaptive else "The images were crafted in this run."),
        f"Certified FCSB (n={demo.certify_n}, alpha={demo.alpha}, on the {adaptive_count(demo)} adaptive images): the "
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
    print(f"\nCounts: {len(items)} questions (clean, transfer, noise), {adaptive_count(demo)} adaptive images; "
          f"full-size figures: docs/results.md.")
    print(f"wrote {out_dir}/report.md, accuracy_vs_budget.png, summary.json")
    return {"rows": rows}

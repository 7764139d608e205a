"""What the defense buys: base / FS / FS+GSB under both threat models, side by side, on one question set.

Why one module: the demo and ``benchmarks/bench_defense.py`` must report the same rows computed the
same way, and a robustness figure must always name its protocol (DESIGN.md section 6):

* **transfer** (the paper's protocol): targeted feature matching towards a target image (AttackVLM;
  M-Attack's local crops), crafted *once* on the undefended model (or named surrogates) and replayed
  unchanged on every variant. Base is attacked by the same images, so base attack success says
  whether the attack works at all: an attack that fails on base proves nothing about FS.
* **adaptive** (white-box against the defense): PGD through each variant's own smoothed path with EOT
  (:mod:`fs_mllm.attacks`), untargeted on the answer by default.

Rows (one per variant x protocol x budget) carry: accuracy on the attacked questions, untargeted attack
success (a right answer turned wrong), targeted success (transfer: the answer became the variant's own
answer for the target image, counted where that differs from its clean answer), mean FCS of the
decoder-facing features clean vs attacked, and the mean certified FCSB at the budget (an linf ball of
radius e lies inside the l2 ball of radius e * sqrt(d), so that is the l2 radius certified; vacuous
bounds count as -1, the trivial cosine bound).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import AttackConfig, attack, feature_cosine, generate_text, image_features
from .certify import certify_model
from .config import FSConfig
from .patching import patch_model, unpatch_model
from .stats import fcsb

VARIANTS = ("base", "fs", "fs+gsb")
TRANSFER_LINF = (4 / 255, 8 / 255, 16 / 255)
ADAPTIVE_L2 = (0.0625, 0.125, 0.25, 0.5, 1.0)
ADAPTIVE_LINF = (1 / 255, 2 / 255, 4 / 255)


def check_variants(variants: Any) -> tuple[str, ...]:
    """A non-empty tuple of distinct VARIANTS, from a tuple/list or a comma string ("base,fs+gsb")."""
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    variants = tuple(variants)
    if not variants:
        raise ValueError(f"variants must name at least one of {VARIANTS}")
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"variants: unknown variant {name!r}; choose from {VARIANTS}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants must not repeat a variant, got {variants}")
    return variants

__all__ = ["VARIANTS", "DefenseSettings", "check_variants", "EvalItem", "answer_metrics", "apply_variant", "defense_table", "evaluate_defense", "synthetic_items"]


def apply_variant(model: nn.Module, variant: str, config: FSConfig, processor: Any = None, booster: Any = None) -> nn.Module:
    """Put ``model`` in one of VARIANTS: unpatched, smoothed with ``config``, or smoothed with the booster too."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    unpatch_model(model)
    if variant == "base":
        return model
    if variant == "fs+gsb" and booster is None:
        raise ValueError("variant 'fs+gsb' needs booster= (a GaussianSmoothnessBooster)")
    return patch_model(model, config, processor=processor, booster=booster if variant == "fs+gsb" else None)


@dataclass
class DefenseSettings:
    """One defense evaluation. Budgets are in [0,1] pixel units; an empty tuple skips that protocol."""

    fs: FSConfig = field(default_factory=FSConfig)  # the smoothing of the FS variants
    variants: tuple[str, ...] = VARIANTS
    transfer_linf: tuple[float, ...] = TRANSFER_LINF
    transfer_steps: int = 300
    transfer_step_size: float = 1 / 255
    crop_scale: Optional[tuple[float, float]] = (0.5, 1.0)
    surrogates: Optional[tuple[str, ...]] = None  # None: the undefended model's own image path
    adaptive_l2: tuple[float, ...] = ADAPTIVE_L2
    adaptive_linf: tuple[float, ...] = ADAPTIVE_LINF
    adaptive_steps: int = 20
    eot_samples: int = 8
    adaptive_objective: str = "untargeted"
    certify_images: int = 16
    certify_n: int = 1000
    alpha: float = 0.001
    max_new_tokens: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        self.variants = check_variants(self.variants)
        if self.adaptive_objective not in ("untargeted", "feature"):
            raise ValueError(f"adaptive_objective must be 'untargeted' or 'feature', got {self.adaptive_objective!r}")
        if not isinstance(self.fs, FSConfig):
            raise ValueError(f"fs must be an fs_mllm.FSConfig (the smoothing of the FS variants), got {type(self.fs).__name__}")
        for name in ("transfer_steps", "adaptive_steps", "eot_samples", "certify_n", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.certify_images, bool) or not isinstance(self.certify_images, int) or self.certify_images < 0:
            raise ValueError(f"certify_images must be an integer >= 0, got {self.certify_images!r}")
        # every budget goes through AttackConfig's own range checks now, before any model work
        for eps in self.transfer_linf:
            self._transfer_config(eps)
        for norm, budgets in (("l2", self.adaptive_l2), ("linf", self.adaptive_linf)):
            for eps in budgets:
                self._adaptive_config(norm, eps)

    def _transfer_config(self, eps: float) -> AttackConfig:
        return AttackConfig(norm="linf", eps=eps, steps=self.transfer_steps, step_size=self.transfer_step_size,
                            objective="feature_target", protocol="transfer", crop_scale=self.crop_scale, seed=self.seed)

    def _adaptive_config(self, norm: str, eps: float) -> AttackConfig:
        return AttackConfig(norm=norm, eps=eps, steps=self.adaptive_steps, objective=self.adaptive_objective,
                            protocol="adaptive", eot_samples=self.eot_samples, eot_chunk_size=1, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalItem:
    """One question about one [0,1] image, with the accepted answers and a target image for transfer."""

    image: torch.Tensor  # (3, H, W)
    question: str
    answers: list[str]
    target: torch.Tensor  # (3, H, W): another image, whose features the transfer attack pulls towards
    prompt: str = ""
    meta: dict = field(default_factory=dict)


def synthetic_items(n_images: int, size: int, prompt_fn: Any, first_question_only: bool = False, start: int = 0) -> list[EvalItem]:
    """Held-out synthetic questions (fs-mini-llava's own task): every question of ``n_images`` images, or
    only the first of each. The target of image i is held-out image i+1 (another scene, other answers)."""
    from .image_io import to_tensor01
    from .synthetic import make_dataset

    examples = make_dataset(n_images + 1, split="heldout", size=size, start=start)
    tensors = [to_tensor01(e.image, size) for e in examples]
    items = []
    for i, example in enumerate(examples[:n_images]):
        for question, answers in example.qa[:1] if first_question_only else example.qa:
            items.append(EvalItem(tensors[i], question, list(answers), tensors[i + 1], prompt_fn(question),
                                  {"image_index": start + i}))
    return items


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if len(values) else None


def _l2_radius(norm: str, eps: float, image: torch.Tensor) -> float:
    return eps if norm == "l2" else eps * math.sqrt(image.numel())


def evaluate_defense(model: nn.Module, processor: Any, clean_items: Sequence[EvalItem], attack_items: Sequence[EvalItem],
                     settings: DefenseSettings, booster: Any = None, progress: bool = True) -> list[dict[str, Any]]:
    """Rows of the defense table (see the module doc); ``clean_items`` give clean accuracy, ``attack_items``
    are attacked (one question per image) under every budget of both protocols."""
    from .answers import answers_match as vqa_match

    if not clean_items or not attack_items:
        raise ValueError("clean_items and attack_items must not be empty")
    if "fs+gsb" in settings.variants and booster is None:
        raise ValueError("variants include 'fs+gsb' but booster is None")
    sigma = settings.fs.sigma
    attack_images = torch.stack([item.image for item in attack_items])
    targets = torch.stack([item.target for item in attack_items])
    attack_prompts = [item.prompt for item in attack_items]
    attack_answers = [item.answers for item in attack_items]
    clean_images = torch.stack([item.image for item in clean_items])
    clean_prompts = [item.prompt for item in clean_items]

    # transfer images: crafted once, without the defense, before any variant sees them
    unpatch_model(model)
    transfer = {}
    for eps in tqdm(settings.transfer_linf, desc="crafting transfer images", disable=not progress):
        config = settings._transfer_config(eps)
        transfer[eps] = attack(model, processor, attack_images, None, config, target_images=targets,
                               surrogates=list(settings.surrogates) if settings.surrogates else None).adv_images

    budgets = [("transfer", "linf", eps) for eps in settings.transfer_linf]
    budgets += [("adaptive", "l2", eps) for eps in settings.adaptive_l2]
    budgets += [("adaptive", "linf", eps) for eps in settings.adaptive_linf]
    rows: list[dict[str, Any]] = []
    for variant in settings.variants:
        apply_variant(model, variant, settings.fs, processor, booster)
        bar = tqdm(total=3 + len(budgets), desc=variant, unit="stage", disable=not progress)
        clean_out = generate_text(model, processor, clean_images, clean_prompts, settings.max_new_tokens)
        clean_correct = [vqa_match(o, item.answers) for o, item in zip(clean_out, clean_items)]
        bar.update()
        clean_attack_out = generate_text(model, processor, attack_images, attack_prompts, settings.max_new_tokens)
        target_out = generate_text(model, processor, targets, attack_prompts, settings.max_new_tokens)
        bar.update()
        s_low: list[float] = []
        if variant != "base" and settings.certify_images:
            certificates = []
            for i in range(min(settings.certify_images, len(attack_items))):
                certificates += certify_model(model, attack_images[i:i + 1], n=settings.certify_n, alpha=settings.alpha)
            s_low = [c.score_lower for c in certificates]
        bar.update()

        def certified(radius: float) -> Optional[float]:
            return _mean([float(fcsb(s, radius, sigma)) for s in s_low]) if s_low else None

        rows.append({"variant": variant, "protocol": "clean", "norm": "-", "eps": 0.0, "n": len(clean_items),
                     "accuracy": _mean([float(c) for c in clean_correct]), "attack_success": None,
                     "targeted_success": None, "fcs": None, "certified_fcsb": certified(sigma / 2),
                     "certified_radius_l2": sigma / 2})
        clean_features = None  # the variant's features of the clean attack images, once for every transfer budget
        for protocol, norm, eps in budgets:
            if protocol == "transfer":  # FCS as this variant's decoder sees the replayed images
                adv = transfer[eps]
                with torch.no_grad():
                    if clean_features is None:
                        clean_features = image_features(model, attack_images, processor=processor)
                    fcs = feature_cosine(clean_features, image_features(model, adv, processor=processor)).tolist()
            else:
                # untargeted: push the model away from the accepted answer (what accuracy counts)
                answers = [a[0] for a in attack_answers] if settings.adaptive_objective == "untargeted" else None
                result = attack(model, processor, attack_images, attack_prompts if answers else None,
                                settings._adaptive_config(norm, eps), answers=answers)
                adv, fcs = result.adv_images, result.fcs
            adv_out = generate_text(model, processor, adv, attack_prompts, settings.max_new_tokens)
            metrics = answer_metrics(clean_attack_out, adv_out, attack_answers, target_out if protocol == "transfer" else None)
            radius = _l2_radius(norm, eps, attack_images[0])
            rows.append({"variant": variant, "protocol": protocol, "norm": norm, "eps": float(eps), "n": len(attack_items),
                         **metrics, "fcs": _mean(fcs), "certified_fcsb": certified(radius), "certified_radius_l2": radius})
            bar.update()
        bar.close()
    unpatch_model(model)
    return rows


def answer_metrics(clean_outputs: Sequence[str], adv_outputs: Sequence[str], answers: Sequence[Sequence[str]],
                   target_outputs: Optional[Sequence[str]] = None) -> dict[str, Optional[float]]:
    """accuracy of the attacked answers; attack_success: of the questions answered right on the clean image,
    the fraction answered wrong after the attack; targeted_success (when ``target_outputs``, the variant's
    answers for the target images): of the questions whose target answer differs from the clean answer, the
    fraction whose attacked answer became the target answer (a target equal to the clean answer proves nothing)."""
    from .answers import answers_match as vqa_match, normalize_answer as norm

    if not (len(clean_outputs) == len(adv_outputs) == len(answers)):
        raise ValueError("clean_outputs, adv_outputs and answers must have one entry per question")
    wrong = [not vqa_match(o, a) for o, a in zip(adv_outputs, answers)]
    flipped = [w for w, c, a in zip(wrong, clean_outputs, answers) if vqa_match(c, a)]
    targeted = None
    if target_outputs is not None:
        aimed = [(o, t) for o, t, c in zip(adv_outputs, target_outputs, clean_outputs) if norm(t) != norm(c)]
        targeted = _mean([float(norm(o) == norm(t)) for o, t in aimed])
    return {"accuracy": _mean([float(not w) for w in wrong]), "attack_success": _mean([float(f) for f in flipped]),
            "targeted_success": targeted}


def defense_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table, budgets written as the reader knows them (linf in /255)."""
    header = "| variant | protocol | budget | n | accuracy | attack success | targeted success | FCS | certified FCSB (l2 radius) |"
    lines = [header, "|" + "---|" * 9]

    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    for row in rows:
        if row["protocol"] == "clean":
            budget = "none"
        elif row["norm"] == "linf":
            budget = f"linf {row['eps'] * 255:g}/255"
        else:
            budget = f"l2 {row['eps']:g}"
        bound = "-" if row["certified_fcsb"] is None else f"{row['certified_fcsb']:.3f} ({row['certified_radius_l2']:.3g})"
        lines.append(f"| {row['variant']} | {row['protocol']} | {budget} | {row['n']} | {fmt(row['accuracy'])} | "
                     f"{fmt(row['attack_success'])} | {fmt(row['targeted_success'])} | {fmt(row['fcs'])} | {bound} |")
    return "\n".join(lines)

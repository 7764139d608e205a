"""Robustness metrics: attack success rate, feature cosine similarity, certified FCSB curves.

These turn raw attack/certification outputs into the numbers reported for base, FS and FS+GSB side
by side (DESIGN.md section 6). The certified curve uses the certificate's own formula from
:func:`fs_mllm.stats.fcsb`, so what is plotted is exactly what is certified.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..answers import normalize_text
from .vqa import vqa_score

__all__ = [
    "normalize_text",
    "targeted_success",
    "attack_success",
    "attack_success_rate",
    "attack_outcomes",
    "outcome_rate",
    "feature_cosine_similarity",
    "certified_curve",
    "plot_certified_curve",
    "plot_accuracy_vs_budget",
    "summary_table",
]



def targeted_success(output: str, target: str) -> bool:
    """True when the normalised target appears in the normalised output as whole words.

    Whole-word containment (``"cat"`` is not found in ``"concatenate"``) because models wrap the
    forced answer in a sentence ("The answer is: cat.").
    """
    t = normalize_text(target)
    if not t:
        raise ValueError("target must contain at least one word character")
    return f" {t} " in f" {normalize_text(output)} "


def _as_list(x: Sequence[Any] | None, name: str) -> list[Any] | None:
    if x is None:
        return None
    if isinstance(x, str):
        raise ValueError(f"{name} must be a list, not a single str")
    return list(x)


def attack_success(
    adv_outputs: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    clean_outputs: Sequence[str] | None = None,
    answers_list: Sequence[Sequence[str]] | None = None,
) -> list[bool]:
    """Per-item attack success.

    * ``targets`` given (targeted attack): the target text appears in the adversarial output.
    * else ``answers_list`` given (untargeted VQA): the adversarial answer is wrong, i.e. its official
      VQA score is 0.
    * else ``clean_outputs`` given (untargeted, no labels): the normalised output changed.
    """
    adv = _as_list(adv_outputs, "adv_outputs")
    if not adv:
        raise ValueError("adv_outputs must not be empty")
    refs = {"targets": _as_list(targets, "targets"), "clean_outputs": _as_list(clean_outputs, "clean_outputs"),
            "answers_list": _as_list(answers_list, "answers_list")}
    for name, value in refs.items():
        if value is not None and len(value) != len(adv):
            raise ValueError(f"{name} must have the same length as adv_outputs ({len(adv)}), got {len(value)}")
    if refs["targets"] is not None:
        return [targeted_success(o, t) for o, t in zip(adv, refs["targets"])]
    if refs["answers_list"] is not None:
        return [vqa_score(o, a) == 0.0 for o, a in zip(adv, refs["answers_list"])]
    if refs["clean_outputs"] is not None:
        return [normalize_text(o) != normalize_text(c) for o, c in zip(adv, refs["clean_outputs"])]
    raise ValueError("attack_success needs one of targets=, answers_list= or clean_outputs=")


def attack_success_rate(
    adv_outputs: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    clean_outputs: Sequence[str] | None = None,
    answers_list: Sequence[Sequence[str]] | None = None,
    only_clean_correct: bool = False,
) -> float:
    """Fraction of successful attacks (see :func:`attack_success` for the success rule).

    ``only_clean_correct=True`` (untargeted VQA, needs ``clean_outputs`` and ``answers_list``)
    counts only questions the model answered correctly (score > 0) before the attack, the usual
    convention when an attack can only "flip" answers that were right.
    """
    success = attack_success(adv_outputs, targets=targets, clean_outputs=clean_outputs, answers_list=answers_list)
    if only_clean_correct:
        if targets is not None or clean_outputs is None or answers_list is None:
            raise ValueError("only_clean_correct=True needs clean_outputs= and answers_list= and no targets=")
        keep = [vqa_score(c, a) > 0.0 for c, a in zip(clean_outputs, answers_list)]
        success = [s for s, k in zip(success, keep) if k]
        if not success:
            raise ValueError("only_clean_correct=True but the model answered no question correctly before the attack")
    return sum(success) / len(success)


def attack_outcomes(
    adv_outputs: Sequence[str],
    clean_outputs: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    answers_list: Sequence[Sequence[str]] | None = None,
) -> list[Optional[bool]]:
    """Per item, whether the attack succeeded, or None where it had nothing to win, so a variant that
    answers less before the attack does not look easier to attack.

    * ``targets``: the target text appears in the adversarial output; None where the clean output has it already.
    * else ``answers_list``: a right answer (VQA score > 0) turned wrong (score 0); None where the clean
      answer was wrong already.
    * else: the normalised output changed (no labels: every item counts).
    """
    success = attack_success(adv_outputs, targets=targets, clean_outputs=clean_outputs, answers_list=answers_list)
    if targets is None and answers_list is None:
        return list(success)
    clean = _as_list(clean_outputs, "clean_outputs")
    if clean is None or len(clean) != len(success):
        raise ValueError(f"clean_outputs must hold one output per adv_outputs ({len(success)})")
    won_already = attack_success(clean, targets=targets, answers_list=answers_list)
    return [None if already else s for s, already in zip(success, won_already)]


def outcome_rate(outcomes: Sequence[Optional[bool]]) -> Optional[float]:
    """Successes over the items that count (None: none counts)."""
    counted = [o for o in outcomes if o is not None]
    return sum(counted) / len(counted) if counted else None


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have a batch dimension, got a scalar")
    return arr


def feature_cosine_similarity(clean_features: Any, adv_features: Any, reduction: str = "mean") -> float | np.ndarray:
    """Cosine between clean and adversarial image features (FCS), one value per image.

    Features of shape (N, D) or (N, T, D) are flattened per image (the global mode of the
    certificate), so the empirical FCS is directly comparable with the certified FCSB.
    ``reduction``: ``"mean"`` (float) or ``"none"`` (array of N values).
    """
    a = _to_numpy(clean_features, "clean_features")
    b = _to_numpy(adv_features, "adv_features")
    if a.shape != b.shape:
        raise ValueError(f"clean_features and adv_features must have the same shape, got {a.shape} and {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("clean_features must contain at least one image")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if np.any(na == 0) or np.any(nb == 0):
        raise ValueError("clean_features/adv_features contain an all-zero feature vector; cosine is undefined")
    cos = np.clip(np.sum(a * b, axis=1) / (na * nb), -1.0, 1.0)
    return float(cos.mean()) if reduction == "mean" else cos


def certified_curve(
    s_low: Sequence[float] | np.ndarray,
    sigma: float,
    radii: Sequence[float] | np.ndarray | None = None,
    thresholds: Sequence[float] = (0.5, 0.7, 0.9),
) -> dict[str, Any]:
    """Certified FCSB curve over a set of images.

    For each radius r: the mean over images of FCSB(S_low, r, sigma) (vacuous bounds count as -1.0,
    the trivial cosine bound, so the mean stays a valid lower bound on the mean cosine), and for each
    threshold tau the fraction of images whose certified cosine is >= tau.

    ``radii`` defaults to 41 points in [0, 2*sigma]. Returns a JSON-able dict with ``sigma``,
    ``radius``, ``mean_bound``, ``certified_fraction`` ({str(tau): list}) and ``num_images``.
    """
    from fs_mllm.stats import fcsb

    s = np.asarray(s_low, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("s_low must contain at least one image score")
    if not math.isfinite(float(sigma)) or float(sigma) <= 0:
        raise ValueError(f"sigma must be a positive float, got {sigma!r}")
    r = np.linspace(0.0, 2.0 * float(sigma), 41) if radii is None else np.asarray(radii, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("radii must contain at least one radius")
    taus = [float(t) for t in thresholds]
    for t in taus:
        if not -1.0 <= t <= 1.0:
            raise ValueError(f"thresholds must lie in [-1, 1] (cosine similarities), got {t}")
    bounds = np.asarray(fcsb(s[:, None], r[None, :], float(sigma)), dtype=np.float64)  # (N, R)
    return {
        "sigma": float(sigma),
        "num_images": int(s.size),
        "radius": r.tolist(),
        "mean_bound": bounds.mean(axis=0).tolist(),
        "certified_fraction": {f"{t:g}": (bounds >= t).mean(axis=0).tolist() for t in taus},
    }


def _new_figure(ncols: int, width: float = 5.5, height: float = 4.0):
    """An Agg-backed figure that never touches pyplot's global backend (safe on headless servers
    and inside notebooks using another backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)


def _check_out_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path must end with .png, got {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return path


def plot_certified_curve(
    curves: Mapping[str, Mapping[str, Any]] | Mapping[str, Any],
    path: str | os.PathLike,
    threshold: float | None = None,
    title: str | None = None,
) -> str:
    """Plot certified curves (output of :func:`certified_curve`) for several methods on one figure.

    ``curves`` is either one curve or ``{"base": curve, "FS": curve, "FS+GSB": curve}``. Left panel:
    mean certified bound vs radius; right panel (when ``threshold`` is given and present in the
    curves): fraction of images certified at cosine >= threshold. Writes a PNG and returns its path.
    """
    path = _check_out_path(path)
    if "radius" in curves:
        curves = {"": curves}  # a single curve
    if not curves:
        raise ValueError("curves must contain at least one curve")
    key = None if threshold is None else f"{float(threshold):g}"
    for name, c in curves.items():
        if "radius" not in c or "mean_bound" not in c:
            raise ValueError(f"curves[{name!r}] is not a certified_curve() result (needs 'radius' and 'mean_bound')")
        if key is not None and key not in c.get("certified_fraction", {}):
            raise ValueError(f"threshold {key} is not in curves[{name!r}]['certified_fraction']; "
                             f"pass it to certified_curve(thresholds=...)")
    fig, axes = _new_figure(1 if key is None else 2)
    for name, c in curves.items():
        label = name or None
        axes[0, 0].plot(c["radius"], c["mean_bound"], marker=".", label=label)
        if key is not None:
            axes[0, 1].plot(c["radius"], c["certified_fraction"][key], marker=".", label=label)
    axes[0, 0].set_xlabel("l2 radius (pixel space [0,1])")
    axes[0, 0].set_ylabel("mean certified cosine (FCSB)")
    axes[0, 0].set_ylim(-1.05, 1.05)
    axes[0, 0].grid(alpha=0.3)
    if key is not None:
        axes[0, 1].set_xlabel("l2 radius (pixel space [0,1])")
        axes[0, 1].set_ylabel(f"fraction certified at cos >= {key}")
        axes[0, 1].set_ylim(-0.02, 1.02)
        axes[0, 1].grid(alpha=0.3)
    if any(curves.keys()):
        axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_budget(
    budgets: Sequence[float],
    accuracies: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    xlabel: str = "attack budget epsilon (l2)",
    ylabel: str = "accuracy",
    title: str | None = None,
) -> str:
    """Plot accuracy (VQA accuracy, CIDEr, ...) under attack vs attack budget, one line per method."""
    path = _check_out_path(path)
    budgets = list(budgets)
    if not budgets:
        raise ValueError("budgets must not be empty")
    if not accuracies:
        raise ValueError("accuracies must map at least one method name to its values")
    for name, acc in accuracies.items():
        if len(acc) != len(budgets):
            raise ValueError(f"accuracies[{name!r}] has {len(acc)} values but budgets has {len(budgets)}")
    fig, axes = _new_figure(1)
    ax = axes[0, 0]
    for name, acc in accuracies.items():
        ax.plot(budgets, list(acc), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def summary_table(rows: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown table plus JSON-able dict from result rows (one dict per method/setting).

    Columns are the union of the rows' keys in first-seen order; a missing cell shows as ``-``
    (``None`` in the JSON). Floats are shown with 4 decimals in markdown, full precision in JSON.
    """
    if isinstance(rows, Mapping):
        raise ValueError("rows must be a list of dicts (one per method), not a single dict")
    rows = list(rows)
    if not rows:
        raise ValueError("rows must contain at least one row")
    columns: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        for k in row:
            if str(k) not in columns:
                columns.append(str(k))
    json_rows = [{c: _jsonable({str(k): v for k, v in row.items()}.get(c)) for c in columns} for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in json_rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    table = {"columns": columns, "rows": json_rows}
    json.dumps(table)  # guarantee it serialises
    return "\n".join(lines) + "\n", table

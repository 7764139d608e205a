"""The model card of a saved patch: ``model_cards/TEMPLATE.md`` filled with the settings and measured figures,
with the YAML metadata the Hub shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..config import FSConfig
from .format import SavedPatch, finite_number

LIBRARY_NAME = "fs-mllm"
TEMPLATE_PATH = Path(__file__).resolve().parent.parent.parent / "model_cards" / "TEMPLATE.md"
RESULT_KEYS = ("certified_fcsb", "attacks", "images", "dataset", "n", "alpha", "command")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_results(results: Optional[Mapping[str, Any]]) -> str:
    """Markdown for measured figures: ``certified_fcsb`` {l2 radius: mean certified FCSB}, ``attacks``
    (rows of {column: value}, e.g. attack, variant, budget, success_rate), and provenance (images,
    dataset, n, alpha, command)."""
    if not results:
        return ("Not measured for this upload. Measure with `fs-mllm certify --model <this repo or folder>` "
                "(certified FCSB) and `fs-mllm attack` / `fs-mllm eval` (attacks), then save again with `results=`.")
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a mapping with keys among {list(RESULT_KEYS)}, got {type(results).__name__}")
    unknown = sorted(set(results) - set(RESULT_KEYS))
    if unknown:
        raise ValueError(f"results: unknown keys {unknown}; expected keys among {list(RESULT_KEYS)}")
    parts = []
    where = ", ".join(f"{k} = {_number(results[k])}" for k in ("images", "dataset", "n", "alpha") if k in results)
    certified = results.get("certified_fcsb")
    if certified:
        if not isinstance(certified, Mapping):
            raise ValueError("results['certified_fcsb'] must map an l2 radius to the mean certified FCSB there")
        rows = []
        for radius, bound in sorted(certified.items(), key=lambda item: float(item[0])):
            if not finite_number(float(radius)) or not finite_number(bound) or not -1 <= bound <= 1:
                raise ValueError(f"results['certified_fcsb']: {radius!r}: {bound!r} must be a radius and a bound in [-1, 1]")
            rows.append(f"| {float(radius):g} | {bound:.4f} |")
        parts.append("Certified feature cosine similarity bound (mean over images; -1 = no guarantee)"
                     + (f", {where}" if where else "") + ":\n\n| l2 radius | certified FCSB |\n|---|---|\n" + "\n".join(rows))
    attacks = results.get("attacks")
    if attacks:
        if not isinstance(attacks, Sequence) or not all(isinstance(row, Mapping) and row for row in attacks):
            raise ValueError("results['attacks'] must be a list of rows, each a non-empty mapping {column: value}")
        columns = list(dict.fromkeys(key for row in attacks for key in row))
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_number(row.get(c, "")) for c in columns) + " |" for row in attacks]
        parts.append("Attacks:\n\n" + "\n".join(lines))
    if not parts:
        raise ValueError("results must contain certified_fcsb and/or attacks")
    if "command" in results:
        parts.append(f"Measured with `{results['command']}`.")
    return "\n\n".join(parts)


def render_card(
    record: SavedPatch,
    *,
    name: str,
    results: Optional[Mapping[str, Any]] = None,
    description: Optional[str] = None,
    license: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> str:
    """The model card: ``model_cards/TEMPLATE.md`` filled, with the YAML metadata the Hub shows
    (``library_name: fs-mllm``, ``base_model``, tags, licence) written by ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    if not TEMPLATE_PATH.is_file():
        raise FileNotFoundError(f"model card template {TEMPLATE_PATH} not found; install fs_mllm from a source checkout")
    config = FSConfig.from_dict(record.fs_config)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME, base_model=record.base_model, license=license, pipeline_tag="image-text-to-text",
        tags=["fs-mllm", "certified-robustness", "feature-space-smoothing", "randomized-smoothing", record.family])
    if record.weights_included:
        base_line = "weights included in this repository" + (f" (from `{record.base_model}`)" if record.base_model else "")
    else:
        base_line = f"`{record.base_model}` at " + (f"revision `{record.base_revision}`" if record.base_revision
                                                     else "its latest revision (not pinned)")
    booster_limit = ("- The booster was trained for a sigma range and one encoder; outside them `fs_mllm` refuses "
                     "to load it.\n" if record.booster else "")
    return TEMPLATE_PATH.read_text(encoding="utf-8").format(
        card_data=card_data.to_yaml(), name=name, description=f"{description.strip()}\n\n" if description else "",
        booster_line=" and a Gaussian Smoothness Booster" if record.booster else "",
        base_line=base_line, family=record.family, sigma=config.sigma, n_samples=config.n_samples, seed=config.seed,
        normalize=config.normalize, alpha=config.alpha, method=config.method,
        booster="GaussianSmoothnessBooster (`gsb.safetensors`)" if record.booster else "none",
        repo_id=repo_id or name,
        transformers_line="`transformers`' own `from_pretrained` on this repository loads the base model, unpatched "
        "(its weights are here)." if record.weights_included else
        f"The base weights are not in this repository: they load from `{record.base_model}`.",
        measured=render_results(results), booster_limit=booster_limit,
        license_line=(f"`{license}`. " if license else "Not stated here: ")
        + ("the base model's licence applies to its weights." if not license else "Check the base model's licence too."),
    )


# ---------------------------------------------------------------------------------------------
# push

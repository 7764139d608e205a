"""Evaluation for fs_mllm: VQA accuracy, caption metrics, robustness metrics and eval datasets.

Plain functions first; the same metrics are also shipped as `evaluate` metric modules
(:func:`load_metric`) so they load offline next to other `evaluate` metrics.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from .caption import caption_metrics, java_available, simple_tokenize
from .robustness import (
    attack_outcomes,
    attack_success,
    attack_success_rate,
    certified_curve,
    feature_cosine_similarity,
    normalize_text,
    outcome_rate,
    plot_accuracy_vs_budget,
    plot_certified_curve,
    summary_table,
    targeted_success,
)
from .vqa import normalize_vqa_answer, vqa_accuracy, vqa_score, vqa_scores

# the eval datasets' names, imported on first use: their module imports Hugging Face ``datasets`` (about a second),
# which a settings class or a command's --help of this package (fs_mllm.evaluation.settings, ...) does not need
_DATASET_NAMES = ("OFFLINE_EVAL_NAME", "SYNTHETIC_EVAL_NAME", "load_eval_dataset", "load_offline_eval", "load_offline_photo",
                  "load_synthetic_heldout", "normalize_eval_columns")


def __getattr__(name: str) -> Any:
    if name in _DATASET_NAMES or name == "datasets":
        # import_module, not ``from . import datasets``: that asks this module for the attribute first (recursion)
        datasets = importlib.import_module(f"{__name__}.datasets")
        return datasets if name == "datasets" else getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_DATASET_NAMES) | {"datasets"})


METRIC_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_modules")
METRIC_NAMES = ("vqa_accuracy", "robust_caption")


def metric_module_path(name: str) -> str:
    """Folder of a shipped `evaluate` metric module, for ``evaluate.load(path)``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"name must be one of {METRIC_NAMES}, got {name!r}")
    return os.path.join(METRIC_MODULES_DIR, name)


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of a shipped metric module; works offline because the script is local."""
    import evaluate

    return evaluate.load(metric_module_path(name), **kwargs)


def text_metric_info(description: str, citation: str, inputs_description: str, reference_url: str) -> Any:
    """``evaluate.MetricInfo`` of a shipped metric module: one predicted string and a list of reference
    strings per example, the input both modules take (datasets >= 4 spells a list ``List``, 3.x ``Sequence``)."""
    import datasets
    import evaluate

    strings = getattr(datasets, "List", None) or datasets.Sequence
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("string"),
                                    "references": strings(datasets.Value("string"))}),
        reference_urls=[reference_url],
    )


__all__ = [
    "METRIC_NAMES",
    "OFFLINE_EVAL_NAME",
    "SYNTHETIC_EVAL_NAME",
    "attack_success",
    "attack_success_rate",
    "attack_outcomes",
    "outcome_rate",
    "caption_metrics",
    "certified_curve",
    "feature_cosine_similarity",
    "java_available",
    "load_eval_dataset",
    "load_metric",
    "load_offline_eval",
    "load_offline_photo",
    "load_synthetic_heldout",
    "metric_module_path",
    "normalize_eval_columns",
    "normalize_text",
    "normalize_vqa_answer",
    "plot_accuracy_vs_budget",
    "plot_certified_curve",
    "simple_tokenize",
    "summary_table",
    "targeted_success",
    "text_metric_info",
    "vqa_accuracy",
    "vqa_score",
    "vqa_scores",
]

"""The summary of an evaluation folder: one table row per (variant, budget), plots, summary.json/md.

Why its own module: the summary is a pure function of the result rows and the settings, computed
after every shard is written (caption metrics are corpus-level, so they cannot be summed per shard);
it reads the store and never the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from fs_mllm.evaluation.caption import caption_metrics
from fs_mllm.results import read_results, result_key
from fs_mllm.evaluation.robustness import (attack_outcomes, certified_curve, outcome_rate, plot_accuracy_vs_budget,
                                           plot_certified_curve, summary_table)
from fs_mllm.evaluation.settings import EvalSettings

__all__ = ["SUMMARY_JSON", "SUMMARY_MD", "CURVE_PNG", "BUDGET_PNG", "summarize"]

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
CURVE_PNG = "certified_curve.png"
BUDGET_PNG = "accuracy_vs_budget.png"


def summarize(output_dir: str | os.PathLike, settings: EvalSettings, dataset_ids: Optional[Sequence[str]] = None,
              write: bool = True) -> dict[str, Any]:
    """Summary table (markdown + JSON) and plots from the result rows of ``output_dir``.

    One table row per (variant, budget): accuracy (VQA accuracy, or CIDEr/BLEU-4/ROUGE-L for captions),
    attack success (VQA: a right answer turned wrong, over the ``counted`` answers right before the attack;
    captions: the caption changed), target hits, mean FCS clean vs adversarial and, for FS variants
    with certification, the mean S_low and certified FCSB at radius sigma/2. Raises ValueError when
    a key of the run is missing (an unfinished run).
    """
    out = Path(output_dir)
    rows = read_results(out)
    if dataset_ids is None:
        dataset_ids = sorted({k[0] for k in rows}, key=lambda i: min(r["index"] for k, r in rows.items() if k[0] == i))
    missing = [(i, v, b) for i in dataset_ids for v in settings.variants for b in settings.budgets
               if result_key(i, v, b) not in rows]
    if missing:
        raise ValueError(f"{len(missing)} results missing in {str(out)!r} (e.g. {missing[:3]}); rerun the same "
                         "command to finish the run")
    table_rows: list[dict[str, Any]] = []
    accuracy: dict[str, list[float]] = {}
    curves: dict[str, Any] = {}
    metric_name = "vqa_accuracy" if settings.task == "vqa" else "CIDEr"
    for variant in settings.variants:
        for budget in settings.budgets:
            sel = [rows[result_key(i, variant, budget)] for i in dataset_ids]
            entry: dict[str, Any] = {"variant": variant,
                                     "attack": "none" if budget == 0 else f"{settings.protocol} {settings.attack_norm} {settings.objective}",
                                     "eps": budget, "n": len(sel)}
            if settings.task == "vqa":
                entry["vqa_accuracy"] = sum(r["score"] for r in sel) / len(sel)
            else:
                cm = caption_metrics([r["prediction"] for r in sel], [r["references"] for r in sel],
                                     meteor=False, tokenizer="simple")
                for m in ("CIDEr", "BLEU-4", "ROUGE-L"):
                    entry[m] = cm[m]
            if budget > 0:
                adv, clean = [r["prediction"] for r in sel], [r["clean_prediction"] for r in sel]
                if settings.task == "vqa":  # a right answer turned wrong, over the right answers before the attack
                    outcomes = attack_outcomes(adv, clean, answers_list=[r["answers"] for r in sel])
                else:  # captions have no right answer: the caption changed
                    outcomes = attack_outcomes(adv, clean)
                entry["attack_success_rate"] = outcome_rate(outcomes)
                entry["counted"] = sum(o is not None for o in outcomes)
                if settings.objective == "targeted":
                    entry["target_hit_rate"] = sum(bool(r.get("target_hit")) for r in sel) / len(sel)
                elif settings.objective == "feature_target":
                    aimed = [r["target_hit"] for r in sel if r.get("target_hit") is not None]
                    entry["targeted_success"] = sum(aimed) / len(aimed) if aimed else None
                fcs = [r["fcs"] for r in sel if r.get("fcs") is not None]
                entry["fcs_mean"] = sum(fcs) / len(fcs) if fcs else None
            else:
                entry["attack_success_rate"] = entry["counted"] = None
                entry["fcs_mean"] = None
            if settings.certify_n and variant != "base":
                s_low = [rows[result_key(i, variant, 0.0)].get("s_low") for i in dataset_ids]
                s_low = [s for s in s_low if s is not None]
                if s_low and budget == 0:
                    entry["mean_s_low"] = sum(s_low) / len(s_low)
                    entry["certified_fcsb@sigma/2"] = certified_curve(s_low, settings.fs.sigma, [settings.fs.sigma / 2])["mean_bound"][0]
                    curves[variant] = certified_curve(s_low, settings.fs.sigma)
                elif s_low and settings.attack_norm == "l2":
                    # the certificate at the attack's own radius, next to the measured FCS
                    entry["certified_fcsb@eps"] = certified_curve(s_low, settings.fs.sigma, [budget])["mean_bound"][0]
            accuracy.setdefault(variant, []).append(entry[metric_name])
            table_rows.append(entry)
    markdown, table = summary_table(table_rows)
    summary = {"settings": settings.to_dict(), "num_examples": len(dataset_ids), "metric": metric_name,
               "table": table, "accuracy_vs_budget": {"budgets": list(settings.budgets), "values": accuracy},
               "certified_curves": curves, "plots": {}}
    if write:
        if curves:
            summary["plots"]["certified_curve"] = plot_certified_curve(
                curves, out / CURVE_PNG, threshold=0.5, title=f"certified FCSB, sigma={settings.fs.sigma}")
        if settings.attack_eps:
            summary["plots"]["accuracy_vs_budget"] = plot_accuracy_vs_budget(
                list(settings.budgets), accuracy, out / BUDGET_PNG,
                xlabel=f"attack budget eps ({settings.attack_norm}, [0,1] pixels)", ylabel=metric_name,
                title=f"{settings.task}: {settings.objective} attack")
        summary["plots"] = {k: os.fspath(v) for k, v in summary["plots"].items()}
        (out / SUMMARY_MD).write_text(markdown, encoding="utf-8")
        tmp = out / (SUMMARY_JSON + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, out / SUMMARY_JSON)
    summary["markdown"] = markdown
    return summary

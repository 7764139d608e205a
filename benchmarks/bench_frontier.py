"""The sigma x n0 frontier on fs-mini-llava: clean accuracy of FS and FS+GSB on held-out synthetic questions.

For each sigma in --sigmas and n0 in --n0: clean VQA accuracy (official-style exact match after answer
normalisation) of the smoothed model, with and without the shipped booster (FS+GSB only where sigma is
inside the booster's trained range), next to base. Prints a table, writes JSON and a plot. This is what
the README's default sigma and n0 are chosen from.

    python benchmarks/bench_frontier.py [--questions 200] [--sigmas 0.0625,0.125,0.25,0.5] [--n0 1,4,8,16,32] [--variants fs,fs+gsb]
        [--threads 1] [--out bench_frontier.json] [--plot frontier.png]
    python benchmarks/bench_frontier.py --merge a.json b.json --plot frontier.png --out all.json   # runs split over processes
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from _bench import float_list, int_list
from fs_mllm.attacks import generate_text
from fs_mllm.arguments import positive_int
from fs_mllm.config import FSConfig
from fs_mllm.defense import apply_variant, synthetic_items
from fs_mllm.booster.model import GaussianSmoothnessBooster
from fs_mllm.models import load_mini_llava
from fs_mllm.models.mini_llava import BOOSTER_DIR, IMAGE_SIZE, build_prompt
from fs_mllm.synthetic import vqa_match


def render(results: dict, sigmas: list[float], n0s: list[int], questions: int, plot_path: str) -> str:
    """The markdown table and the plot of one frontier (results as written to the JSON)."""
    header = "| sigma | variant | " + " | ".join(f"n0={n}" for n in n0s) + " |"
    lines = [f"base clean accuracy: {results['base']:.3f} ({questions} held-out questions)", "", header,
             "|" + "---|" * (2 + len(n0s))]
    for sigma in sigmas:
        for variant in ("fs", "fs+gsb"):
            cells = [results[variant].get(f"{sigma:g},{n}") for n in n0s]
            if any(c is not None for c in cells):
                lines.append(f"| {sigma:g} | {variant} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sigma in sigmas:
        for variant, style in (("fs", "--"), ("fs+gsb", "-")):
            points = [(n, results[variant][f"{sigma:g},{n}"]) for n in n0s if f"{sigma:g},{n}" in results[variant]]
            if points:
                ax.plot(*zip(*points), style, marker="o", label=f"{variant.upper()} sigma={sigma:g}")
    ax.axhline(results["base"], color="black", lw=1, label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n0 (noisy copies inside generate)")
    ax.set_ylabel(f"clean accuracy ({questions} questions)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    return "\n".join(lines)


def merge(paths: list[str], plot_path: str, out_path: str) -> None:
    """One table, plot and JSON from runs split over processes (e.g. by n0), which share the question set.
    A cell measured by several runs keeps the last run's value (list the runs oldest first)."""
    runs = [json.load(open(path, encoding="utf-8")) for path in paths]
    if len({run["questions"] for run in runs}) != 1:
        raise SystemExit("--merge: the runs used different question counts")
    results = {"base": runs[0]["results"]["base"], "fs": {}, "fs+gsb": {}}
    for run in runs:
        for variant in ("fs", "fs+gsb"):
            results[variant].update(run["results"][variant])
    keys = [k for v in ("fs", "fs+gsb") for k in results[v]]
    sigmas = sorted({float(k.split(",")[0]) for k in keys})
    n0s = sorted({int(k.split(",")[1]) for k in keys})
    if len({run["results"]["base"] for run in runs}) != 1:
        raise SystemExit("--merge: the runs disagree on base accuracy, so they did not share the question set")
    table = render(results, sigmas, n0s, runs[0]["questions"], plot_path)
    print(table)
    print(f"\n(seconds per run: {[round(run['seconds']) for run in runs]})")
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"questions": runs[0]["questions"], "results": results, "seconds": sum(run["seconds"] for run in runs),
                   "merged_from": [{"path": path, "booster": run.get("booster"), "seconds": run["seconds"]}
                                   for path, run in zip(paths, runs)], "table": table}, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=positive_int, default=200)
    parser.add_argument("--sigmas", type=float_list, default=[0.0625, 0.125, 0.25, 0.5])
    parser.add_argument("--n0", type=int_list, default=[1, 4, 8, 16, 32])
    parser.add_argument("--variants", type=lambda text: list(dict.fromkeys(v for v in text.split(",") if v)), default=["fs", "fs+gsb"],
                        help="comma-separated subset of fs,fs+gsb (default both)")
    parser.add_argument("--booster", default=str(BOOSTER_DIR))
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", default="bench_frontier.json")
    parser.add_argument("--plot", default="frontier.png")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print one table/plot from runs split over processes")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.plot, args.out)
        return
    unknown = sorted(set(args.variants) - {"fs", "fs+gsb"})
    if unknown or not args.variants:
        parser.error(f"--variants must name fs and/or fs+gsb, got {','.join(args.variants) or 'nothing'}")
    for sigma, n0 in ((s, n) for s in args.sigmas for n in args.n0):
        try:
            FSConfig(sigma=sigma, n_samples=n0)  # a bad sigma or n0 fails here, before the model loads
        except ValueError as error:
            parser.error(f"--sigmas/--n0: {error}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor = load_mini_llava()
    booster = GaussianSmoothnessBooster.from_pretrained(args.booster).eval()
    items, n_images = [], 0
    while len(items) < args.questions:
        n_images += 1
        items = synthetic_items(n_images, IMAGE_SIZE, build_prompt)
    items = items[:args.questions]

    def accuracy() -> float:
        hits = 0
        for item in tqdm(items, leave=False, desc="questions"):
            answer = generate_text(model, processor, item.image[None], [item.prompt], max_new_tokens=6)[0]
            hits += vqa_match(answer, item.answers)
        return hits / len(items)

    def save(results: dict, seconds: float, table: Optional[str]) -> None:
        """Written after every cell (atomically), so a run stopped early keeps what it measured."""
        partial = args.out + ".tmp"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump({"questions": len(items), "results": results, "seconds": seconds, "booster": args.booster,
                       "complete": table is not None, "table": table}, f, indent=2)
        os.replace(partial, args.out)

    apply_variant(model, "base", FSConfig())
    results = {"base": accuracy(), "fs": {}, "fs+gsb": {}}
    lo, hi = booster.config.sigma_min, booster.config.sigma_max
    for sigma in args.sigmas:
        for n0 in args.n0:
            for variant in args.variants:
                if variant == "fs+gsb" and not lo <= sigma <= hi:
                    continue
                apply_variant(model, variant, FSConfig(sigma=sigma, n_samples=n0), processor, booster)
                results[variant][f"{sigma:g},{n0}"] = accuracy()
                print(f"{variant} sigma={sigma:g} n0={n0}: {results[variant][f'{sigma:g},{n0}']:.3f}", flush=True)
                save(results, time.perf_counter() - start, None)
    apply_variant(model, "base", FSConfig())
    seconds = time.perf_counter() - start

    table = render(results, args.sigmas, args.n0, len(items), args.plot)
    print(table)
    print(f"\n{seconds:.0f} s, {args.threads} thread(s)")
    save(results, seconds, table)


if __name__ == "__main__":
    main()

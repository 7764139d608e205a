"""Gap between the lower-bound methods on a real encoder: DINOv2 ViT-S/14 on real photos.

Prints, per photo and on average, the Monte-Carlo mean of the robustness score S and the lower
bounds from Hoeffding, empirical Bernstein and betting at the same n and alpha (same samples), and
FCSB(sigma/2) from each. Usage: python benchmarks/bench_bounds.py [--n 1000] [--alpha 0.001] [--size 112]
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from fs_mllm import fcsb
from fs_mllm.certify import sample_scores
from fs_mllm.evaluation import load_offline_eval
from fs_mllm.models import load_dinov2
from fs_mllm.stats import score_lower_bound

DINO_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
DINO_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=112, help="input resolution (multiple of 14)")
    parser.add_argument("--photos", type=int, default=6, help="how many of the real offline photos")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_dinov2().eval()

    def encoder(images01: torch.Tensor) -> torch.Tensor:
        pixels = (images01 - DINO_MEAN) / DINO_STD
        return model(pixel_values=pixels).last_hidden_state[:, 1:]  # patch tokens, flattened per image

    photos = load_offline_eval("caption").select(range(args.photos))
    names = [f"photo {i}" for i in photos["image_id"]]
    images = []
    for image in photos["image"]:
        photo = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        images.append(F.interpolate(photo[None], size=(args.size, args.size), mode="bilinear", antialias=True)[0])
    images = torch.stack(images).clamp(0, 1)
    start = time.perf_counter()
    scores = sample_scores(encoder, images, args.sigma, args.n, chunk_size=25)[:, :].numpy().T  # (B, n)
    elapsed = time.perf_counter() - start
    methods = ("hoeffding", "bernstein", "betting")
    print(f"DINOv2 ViT-S/14, {args.size}px, sigma={args.sigma}, n={args.n}, alpha={args.alpha}, {elapsed:.1f}s sampling")
    print(f"{'photo':14s} {'S mean':>8s} " + " ".join(f"{m:>10s}" for m in methods) + "   FCSB(sigma/2) h/b/w")
    lows = {m: score_lower_bound(scores, args.alpha, m) for m in methods}
    for i, name in enumerate(names):
        bounds = [fcsb(lows[m][i], args.sigma / 2, args.sigma) for m in methods]
        print(f"{name:14s} {scores[i].mean():8.4f} " + " ".join(f"{lows[m][i]:10.4f}" for m in methods)
              + "   " + "/".join(f"{b:.3f}" for b in bounds))
    gap_hb = (lows["bernstein"] - lows["hoeffding"]).mean()
    gap_bw = (lows["betting"] - lows["bernstein"]).mean()
    print(f"mean S {scores.mean():.4f}; mean lower bound gap bernstein - hoeffding = {gap_hb:.4f}, betting - bernstein = {gap_bw:.4f}")


if __name__ == "__main__":
    main()

"""What a Gaussian noise draw costs on the CPU, per number, for the ways torch and numpy can make one.

Why: the smoothed feature function draws ``n0 x 3 x H x W`` normals per image (150 528 per 224 px copy)
from each image's own stream (``fs_mllm.smoothing.iter_noisy_features``: ``Tensor.normal_`` with a
``torch.Generator``); on the tiny LLaVA tower that was 3.3% of the tower's time (benchmarks/README). This
prints, side by side in one process with one torch thread, nanoseconds per number of:

- ``torch float32 normal_`` (what the package draws): MT19937 uniforms + a vectorised Box-Muller;
- ``torch float32 uniform_`` and ``torch int32 random_``: the uniform source alone (no candidate that
  keeps torch's generator can cost less than this);
- ``torch float16 / bfloat16 normal_``: drawing in half precision;
- ``numpy float32 standard_normal`` (ziggurat) over PCG64, SFC64, Philox and MT19937 bit generators.

Each figure is min / median over interleaved repeats, with the ratio to the package's draw.
Usage: python benchmarks/bench_noise.py [--size 224] [--copies 8] [--repeats 30] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _bench import RESULTS, interleaved_times, machine, write_json

CURRENT = "torch float32 normal_"


def candidates(count: int) -> dict[str, Callable[[], object]]:
    """Callables that each fill ``count`` numbers once (fresh generators, seeded like an image stream)."""
    generator = torch.Generator().manual_seed(2**40 + 7)
    f32, f16, bf16 = (torch.empty(count, dtype=dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16))
    i32 = torch.empty(count, dtype=torch.int32)
    out = np.empty(count, dtype=np.float32)
    fns: dict[str, Callable[[], object]] = {
        CURRENT: lambda: f32.normal_(generator=generator),
        "torch float32 uniform_ (uniforms only)": lambda: f32.uniform_(generator=generator),
        "torch int32 random_ (raw bits only)": lambda: i32.random_(generator=generator),
        "torch float16 normal_": lambda: f16.normal_(generator=generator),
        "torch bfloat16 normal_": lambda: bf16.normal_(generator=generator),
    }
    for name, bits in (("PCG64", np.random.PCG64), ("SFC64", np.random.SFC64), ("Philox", np.random.Philox),
                       ("MT19937", np.random.MT19937)):
        rng = np.random.Generator(bits(2**40 + 7))
        fns[f"numpy float32 standard_normal, {name}"] = lambda rng=rng: rng.standard_normal(out=out, dtype=np.float32)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (3 channels)")
    parser.add_argument("--copies", type=int, default=8, help="noisy copies per draw (n0)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 56 px, 2 copies, 3 repeats")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.copies, args.repeats = 56, 2, 3
    torch.set_num_threads(1)
    count = 3 * args.size * args.size * args.copies
    times = interleaved_times(candidates(count), args.repeats, warmup=2, clock="cpu")
    per_number = {name: {"min_ns": min(t) / count * 1e9, "median_ns": statistics.median(t) / count * 1e9}
                  for name, t in times.items()}
    base = per_number[CURRENT]
    print(f"{count} normals per draw ({args.copies} copies of 3 x {args.size} x {args.size}); {machine()}")
    print(f"{'draw':48s} {'ns/number min / median':>24s} {'x package min / median':>24s}")
    for name, figures in per_number.items():
        figures["ratio_min"] = figures["min_ns"] / base["min_ns"]
        figures["ratio_median"] = figures["median_ns"] / base["median_ns"]
        print(f"{name:48s} {figures['min_ns']:11.2f} / {figures['median_ns']:<10.2f} "
              f"{figures['ratio_min']:11.2f} / {figures['ratio_median']:<10.2f}")
    suffix = "_quick" if args.quick else ""
    write_json(f"noise{suffix}_cpu.json", {"numbers_per_draw": count, "size": args.size, "copies": args.copies,
                                            "repeats": args.repeats, "clock": "cpu", "per_number": per_number},
               args.out_dir)


if __name__ == "__main__":
    main()

"""Craft the demo's shipped adaptive images (``fs_mllm/data/demo_adaptive``) with the project's own code.

The default ``fs-mllm demo``'s settings, every variant (base, FS, FS+GSB with the shipped booster): the
adaptive white-box attack through each variant's own smoothed path on the first
``fs_mllm.demo.SHIPPED_ADAPTIVE_EXAMPLES`` held-out images, into a resumable checkpoint that keeps each
attack's images. Then copy its ``settings.json`` and ``adaptive_*.safetensors`` into
``fs_mllm/data/demo_adaptive`` (and update the sha256 table of its README):

    OMP_NUM_THREADS=1 python recipes/make_demo_adaptive.py --checkpoint runs/demo_adaptive
"""

from __future__ import annotations

import argparse
import time

from fs_mllm.demo import make_shipped_adaptive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (rerun with it to resume)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = make_shipped_adaptive(args.checkpoint)
    for row in rows:
        if row["protocol"] == "adaptive":
            print(row["variant"], row["norm"], row["eps"], f"right {row['right_before']} -> {row['right_after']} of {row['n']}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

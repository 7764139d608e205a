"""Does the demo point the same way as the one table? For every protocol the demo shows, the sign of each smoothed
variant's accuracy minus base's, in a demo summary against the one table's cells (docs/results.md, from the
result files through summarize.py).

The one table has 100-200 questions a cell, so a difference below TIE (ten answers in a hundred) is within its
own noise: there it is a tie and either direction of the demo is accepted (printed as such). Everywhere else
the demo's difference must have the one table's sign, strictly. The demo runs the adaptive attack at 2 steps x
EOT 2; it is held against the CPU table's 5 steps x EOT 2 rows, the nearest measured. Exit status 1 on any
disagreement.

Usage: python benchmarks/check_demo.py [SUMMARY] [--results benchmarks/results]
       (SUMMARY: a `fs-mllm demo` summary.json; default benchmarks/results/demo_cpu.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _bench import RESULTS
from summarize import DEFENSE_VARIANTS, defense_table

from fs_mllm.defense import budget_label

TIE = 0.10
# a demo row (protocol, norm, eps) -> the one table's run tag it is held against
TABLE_TAGS = {"clean": "clean", "transfer": "whole view + crop, 300 steps", "noise": "noise", "adaptive": "5 steps x EOT 2"}


def directions(rows: list[dict], judged: dict) -> list[tuple[str, str, float, float, str]]:
    """(budget, variant, demo difference, table difference, verdict) for each smoothed variant of each demo row."""
    out = []
    by_key: dict[tuple, dict] = {}
    for row in rows:
        by_key.setdefault((row["protocol"], row["norm"], round(row["eps"], 9)), {})[row["variant"]] = row
    for (protocol, norm, eps), variants in by_key.items():
        cells = judged.get((protocol, TABLE_TAGS[protocol], norm, eps))
        label = f"{protocol} {budget_label(protocol, norm, eps)}"
        if cells is None:
            raise SystemExit(f"{label}: the one table has no {TABLE_TAGS[protocol]!r} row at this budget to hold the demo against")
        table = {v: None if c is None else c[1] for v, c in zip(DEFENSE_VARIANTS, cells)}
        for variant in DEFENSE_VARIANTS[1:]:
            if table[variant] is None or variant not in variants:
                continue
            demo_diff = variants[variant]["accuracy"] - variants["base"]["accuracy"]
            table_diff = table[variant] - table["base"]
            if abs(table_diff) < TIE:
                verdict = "tie in the table"
            elif demo_diff * table_diff > 0:
                verdict = "agrees"
            else:
                verdict = "DISAGREES"
            out.append((label, variant, demo_diff, table_diff, verdict))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", nargs="?", default=str(RESULTS / "demo_cpu.json"))
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    rows = json.loads(Path(args.summary).read_text())["rows"]
    _, judged, _ = defense_table(Path(args.results))
    found = directions(rows, judged)
    print("| protocol | variant | demo: variant - base | one table: variant - base | direction |")
    print("|---|---|---|---|---|")
    for label, variant, demo_diff, table_diff, verdict in found:
        print(f"| {label} | {variant} | {demo_diff:+.3f} | {table_diff:+.3f} | {verdict} |")
    if any(verdict == "DISAGREES" for *_, verdict in found):
        sys.exit(1)


if __name__ == "__main__":
    main()

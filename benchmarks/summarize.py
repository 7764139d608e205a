"""Print the tables of benchmarks/README.md and README.md from the JSON files the benchmark scripts wrote.

`--table figures` (the default): benchmarks/README's figures. Each row: figure, value (min-based /
median-based ratio where it is a timing), target, met?, the command that printed it, the machine and the
date (all read from the JSON, never typed by hand).

`--table defense`: README's one table of what the defense buys on fs-mini-llava (base / FS / FS+GSB under
every protocol and budget, and the certificate), then the issue's targets with their verdicts. Every
cell comes from the result files named in its row; a row whose files disagree about a cell, or were run
at another sigma or n0, stops the script rather than mix them.

Usage: python benchmarks/summarize.py [--table figures|defense] [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _bench import RESULTS

from fs_mllm.defense import budget_label


def load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def met(value: float, low: float = None, high: float = None) -> str:
    ok = (low is None or value >= low) and (high is None or value <= high)
    return "yes" if ok else "**no**"


def rows(folder: Path) -> list[tuple]:
    out = []

    def add(record, figure, value, target, verdict):
        out.append((figure, value, target, verdict, f"`{record['command']}`", record["machine"], record["date"]))

    for name, label in (("patch_overhead_tiny_cpu.json", "tiny LLaVA"), ("patch_overhead_fs_mini_llava_cpu.json", "fs-mini-llava")):
        r = load(folder, name)
        if r is None:
            continue
        f = r["figures"]
        clock = r.get("clock", "wall")
        g = f["generate_overhead_per_extra_copy"]
        add(r, f"generate, {label}: (patched - base) / ((n0-1) x tower 1 copy), n0 {r['n_samples']}, {clock} time",
            f"{g['min']:.3f} / {g['median']:.3f}", "[0.95, 1.05]",
            met(g["min"], 0.95, 1.05) + f" (tower on n0 copies = {f['tower_n_over_n_tower_1']['min']:.2f} x n0 single copies)")
        c = f["generate_overhead_over_tower_n_minus_tower_1"]
        add(r, f"generate, {label}: (patched - base) / (tower n0 copies - tower 1 copy)", f"{c['min']:.3f} / {c['median']:.3f}",
            "1.0 (no issue target)", "-")
        lm = f["lm_time_patched_over_base"]
        add(r, f"generate, {label}: language-model time patched / base", f"{lm['min']:.3f} / {lm['median']:.3f}", "<= 1.02",
            met(lm["min"], None, 1.02))
        s = f["smoothed_fn_over_tower_n"]
        add(r, f"smoothed feature fn / tower on n0 copies, {label}", f"{s['min']:.3f} / {s['median']:.3f}", "<= 1.03",
            met(s["min"], None, 1.03))
    for path in sorted(folder.glob("certify_*_cpu.json")) + sorted(folder.glob("certify_*_gpu.json")):
        r = json.loads(path.read_text())
        if "quick" in path.name:
            continue
        if "throughput" in r:
            t = r["throughput"]["ratio"]
            add(r, f"certification throughput / bare tower, {r['model']}, n {r['throughput']['n']}, batch "
                f"{r['throughput']['chunk_size']}, {r['throughput'].get('clock', 'wall')} time",
                f"{t['min']:.3f} / {t['median']:.3f}", ">= 0.95", met(t["min"], 0.95))
            if "engine_with_mean_over_scores_only" in r["throughput"]:
                e = r["throughput"]["engine_with_mean_over_scores_only"]
                add(r, f"engine with the running mean as well / scores only (certification's pass), {r['model']}",
                    f"{e['min']:.3f} / {e['median']:.3f}", "measured (no issue target)", "-")
            if r.get("device", "cpu") != "cpu":  # on an accelerator the issue also asks for the rates themselves
                tp = r["throughput"]  # the benchmark certifies one image, so images/s = samples/s / n
                c, w = tp["certify_samples_per_s"], tp["tower_samples_per_s"]
                add(r, f"certification images/s at n {tp['n']} (samples/s of certify_model; of the bare tower), "
                    f"{r['model']}, batch {tp['chunk_size']}, best / median",
                    f"{c['best'] / tp['n']:.3f} / {c['median'] / tp['n']:.3f} ({c['best']:.0f} / {c['median']:.0f}; "
                    f"{w['best']:.0f} / {w['median']:.0f})", "measured (no issue target)", "-")
        if "compile" in r:
            c = r["compile"]
            sp, chk = c["speedup_eager_over_compiled"], c["check"]
            fell_back = f", {c['requested_backend']} failed" if c.get("error") else ""
            for key, label in (("tower", f"bare tower on {c['chunk_size']} copies"),
                               ("certify", f"certify_model n {c['n']}, batch {c['chunk_size']}")):
                add(r, f"torch.compile speedup (eager / compiled time), {label}, backend {c['backend']}{fell_back}, "
                    f"{r['model']}, {c['clock']} time", f"{sp[key]['min']:.3f} / {sp[key]['median']:.3f}",
                    "measured (no issue target)", "-")
            w = c["compile_and_first_call_s"], c["first_certify_s"]
            add(r, f"torch.compile warm-up, {r['model']}: compile + first call; first certify_model (1-copy recompile), "
                "cpu / wall s, excluded above", f"{w[0]['cpu']:.1f} / {w[0]['wall']:.1f}; {w[1]['cpu']:.1f} / {w[1]['wall']:.1f}",
                "-", "-")
            add(r, f"torch.compile features vs eager, {r['model']}: max abs diff (max abs feature), min cosine; "
                "certified S lower eager / compiled",
                f"{chk['max_abs_diff']:.2g} ({chk['max_abs_feature']:.3g}), {chk['cosine_min']:.7f}; "
                f"{chk['score_lower_eager'][0]:.7f} / {chk['score_lower_compiled'][0]:.7f}", "match to fp32 rounding",
                met(chk["cosine_min"], 0.99999))
        if "memory" in r:
            m = r["memory"]
            first, last = m["rows"][0], m["rows"][-1]
            add(r, f"peak RSS of certification n={last['n']} / n={first['n']}, {r['model']}",
                f"{m['peak_ratio']:.3f} (growth {first['growth_kib'] / 1024:.0f} -> {last['growth_kib'] / 1024:.0f} MiB)",
                "<= 1.1", met(m["peak_ratio"], None, 1.1))
        if "scaling" in r:
            s = r["scaling"]
            add(r, f"scaling plot, {r['model']}", f"`{s['plot']}`", "a plot", "yes")
    e = load(folder, "efficiency_cpu.json")
    if e is not None:
        for method, value in e["efficiency_at_n"].items():
            needed = e["n_needed"].get(method)
            add(e, f"certified FCSB(sigma/2) at n={e['n']} / at population S, {method} (DINOv2 ViT-S/14, {e['size']} px, "
                f"{e['photos']} photos, population n {e['population']})",
                f"{value:.3f} (n for 0.95: {needed if needed else '> grid'})", ">= 0.95 (best method)",
                met(value, 0.95) if method == e["best_method"] else "-")
    return out


DEFENSE_VARIANTS = ("base", "fs", "fs+gsb")
DEFENSE_SIGMA, DEFENSE_N0 = 0.25, 8  # the defaults the README's table is about

# One run per entry: protocol, what was run, a short tag for the targets, budgets ((norm, eps)), and the
# result files searched (bench_defense.py JSONs or a checkpoint's rows.jsonl; glob patterns allowed).
ADAPTIVE_BUDGETS = (("l2", 0.0625), ("l2", 0.125), ("l2", 0.25), ("l2", 0.5), ("l2", 1.0),
                    ("linf", 1 / 255), ("linf", 2 / 255), ("linf", 4 / 255))
DEFENSE_RUNS = (
    ("clean", "200 held-out questions", "clean", (("-", 0.0),), ("bench_defense_transfer100_cpu.json",)),
    ("transfer", "crafted once on base, replayed: targeted feature matching, whole view + one random crop per step, "
     "200 steps at 1/255", "whole view + crop", (("linf", 4 / 255), ("linf", 8 / 255)),
     ("bench_defense_transfer100_linf4_crops200_fullview_cpu.json", "bench_defense_transfer100_linf8_crops200_fullview_cpu.json")),
    ("transfer", "the same, 300 steps", "whole view + crop, 300 steps", (("linf", 16 / 255),),
     ("bench_defense_transfer100_crops300_fullview_cpu.json",)),
    ("transfer", "the same without crops, 100 steps at 2/255", "no crops, 100 steps", (("linf", 16 / 255),),
     ("bench_defense_transfer100_cpu.json",)),
    ("noise", "random signs of the budget: the control", "noise", (("linf", 4 / 255), ("linf", 8 / 255), ("linf", 16 / 255)),
     ("bench_defense_transfer100_crops300_step2_noise_cpu.json",)),
    ("adaptive", "untargeted through each variant's smoothed path, 20 steps x EOT 8", "20 steps x EOT 8", ADAPTIVE_BUDGETS,
     ("bench_defense_adaptive100_20x8_gpu_partial/rows.jsonl", "bench_defense_adaptive100_l2_025_20x8_gpu.json")),
    ("adaptive", "the same, 5 steps x EOT 2", "5 steps x EOT 2", ADAPTIVE_BUDGETS, ("bench_defense_adaptive100_*_5x2_cpu.json",)),
)
CERTIFY_FILES = {"fs": "certify_photos_fs_mini_llava_cpu.json", "fs+gsb": "certify_photos_fs_gsb_mini_llava_cpu.json"}


def result_rows(folder: Path, pattern: str) -> list[tuple[str, str, dict]]:
    """(file name, machine, row) of every defense row in the files matching ``pattern``; each file must be
    at the README's sigma and n0, so no table mixes settings."""
    found = []
    for path in sorted(folder.glob(pattern)):
        if path.suffix == ".jsonl":  # a checkpoint: its settings sit beside it
            settings = json.loads((path.parent / "settings.json").read_text())
            rows_ = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows_ = [r for r in rows_ if "protocol" in r]
            name = path.parent.name + "/" + path.name
            device = "cpu" if settings["device_type"] == "cpu" else "gpu"
        else:
            record = json.loads(path.read_text())
            settings, rows_, name = record["settings"], record["rows"], path.name
            device = "cpu" if record["device"] == "cpu" else "gpu"
        fs = settings.get("fs", settings.get("settings", {}).get("fs"))
        if fs is None or (fs["sigma"], fs["n_samples"]) != (DEFENSE_SIGMA, DEFENSE_N0):
            raise SystemExit(f"{name}: not at sigma {DEFENSE_SIGMA}, n0 {DEFENSE_N0} ({fs}); leave it out of DEFENSE_RUNS")
        found += [(name, device, r) for r in rows_]
    if not found:
        raise SystemExit(f"no defense rows in {folder}/{pattern}")
    return found


def defense_cells(folder: Path, protocol: str, files: tuple[str, ...], budgets) -> tuple[dict, set[str]]:
    """{(variant, norm, eps): (n, accuracy, attack success, targeted success)} over the files, refusing two
    files that disagree about one cell, and the machines ("cpu", "gpu") the cells came from."""
    cells, devices = {}, set()
    wanted = {(norm, round(eps, 9)) for norm, eps in budgets}
    for pattern in files:
        for name, device, row in result_rows(folder, pattern):
            key = (row["variant"], row["norm"], round(row["eps"], 9))
            if row["protocol"] != protocol or key[1:] not in wanted:
                continue
            figures = (row["n"], row["accuracy"], row["attack_success"], row["targeted_success"])
            if key in cells and cells[key][1] != figures:
                raise SystemExit(f"{protocol} {key}: {cells[key][0]} and {name} disagree ({cells[key][1]} vs {figures})")
            cells.setdefault(key, (name, figures))
            devices.add(device)
    return {k: v[1] for k, v in cells.items()}, devices


def defense_cell(protocol: str, figures) -> str:
    if figures is None:
        return "not run"
    _, accuracy, success, targeted = figures
    if protocol == "clean":
        return f"{accuracy:.3f}"
    if protocol == "transfer" and targeted is not None:
        return f"{accuracy:.3f} ({success:.3f} / {targeted:.3f})"
    return f"{accuracy:.3f} ({success:.3f})"


def certified_means(folder: Path) -> dict[str, dict[str, float]]:
    """{variant: {"FCSB@0.0625": mean, ...}} over the offline photos, from the `fs-mllm certify` summaries."""
    out = {}
    for variant, name in CERTIFY_FILES.items():
        record = load(folder, name)
        if record is None:
            continue
        table = record["summary"]["table"]
        if record["summary"]["settings"]["sigma"] != DEFENSE_SIGMA:
            raise SystemExit(f"{name}: not at sigma {DEFENSE_SIGMA}")
        columns = [c for c in table["columns"] if c.startswith("FCSB@")]
        out[variant] = {c: sum(r[c] for r in table["rows"]) / len(table["rows"]) for c in columns}
        out[variant]["images"], out[variant]["n"] = len(table["rows"]), record["summary"]["settings"]["n"]
    return out


def defense_table(folder: Path) -> tuple[list[str], dict, dict]:
    """README's one table (markdown lines), the cells the targets are judged on, and the certified means."""
    lines = ["| protocol | what was run | budget | n | machine | base | FS | FS+GSB | files |", "|---|---|---|---|---|---|---|---|---|"]
    judged = {}
    for protocol, what, tag, budgets, files in DEFENSE_RUNS:
        cells, devices = defense_cells(folder, protocol, files, budgets)
        machine = " and ".join(sorted(d.upper() for d in devices))
        for i, (norm, eps) in enumerate(budgets):
            figures = [cells.get((v, norm, round(eps, 9))) for v in DEFENSE_VARIANTS]
            n = {f[0] for f in figures if f is not None}
            judged[(protocol, tag, norm, round(eps, 9))] = figures
            first = i == 0  # later budgets of the same run: ditto
            lines.append(f"| {protocol} | {what if first else chr(34)} | {budget_label(protocol, norm, eps)} | "
                         f"{'/'.join(str(x) for x in sorted(n))} | {machine} | " +
                         " | ".join(defense_cell(protocol, f) for f in figures) +
                         f" | {', '.join(f'`{x}`' for x in files) if first else chr(34)} |")
    certified = certified_means(folder)
    count = ", ".join(f"{i} photos x {n} samples" for i, n in sorted({(c["images"], c["n"]) for c in certified.values()}))
    for i, column in enumerate(("FCSB@0.0625", "FCSB@0.125")):
        values = ["-"] + [f"{certified[v][column]:.3f}" if v in certified else "not run" for v in DEFENSE_VARIANTS[1:]]
        files = ", ".join(f"`{CERTIFY_FILES[v]}`" for v in certified)
        lines.append(f"| certified | {'mean certified FCSB over the offline photos (bernstein, alpha 0.001)' if i == 0 else chr(34)} "
                     f"| l2 {column[5:]} | {count} | CPU | " + " | ".join(values) + f" | {files if i == 0 else chr(34)} |")
    return lines, judged, certified


def defense_targets(judged: dict, certified: dict) -> list[str]:
    """The issue's targets at sigma 0.25 with the measured figures and whether each is met."""
    lines = ["| target (issue 12, sigma 0.25, n0 8) | measured | met? |", "|---|---|---|"]
    base, _, gsb = judged[("clean", "clean", "-", 0.0)]
    lines.append(f"| FS+GSB clean accuracy >= 0.95 x base | {gsb[1]:.3f} against 0.95 x {base[1]:.3f} = {0.95 * base[1]:.3f} | "
                 f"{met(gsb[1], 0.95 * base[1])} |")
    fcsb = certified.get("fs+gsb", {}).get("FCSB@0.125")
    if fcsb is not None:
        lines.append(f"| FS+GSB mean certified FCSB(sigma/2) >= 0.6 (offline photos, n 1000, alpha 0.001) | {fcsb:.3f} | {met(fcsb, 0.6)} |")
    for (protocol, tag, norm, eps), (b, _, g) in judged.items():
        if protocol == "transfer" and eps == round(16 / 255, 9) and b is not None and g is not None:
            lines.append(f"| transfer linf 16/255, {tag}: base attack success >= 0.8, and FS+GSB's <= 0.03 | "
                         f"base {b[2]:.3f}, FS+GSB {g[2]:.3f} | {met(b[2], 0.8)}, {met(g[2], None, 0.03)} |")
    for tag in dict.fromkeys(t for p, t, _, _ in judged if p == "adaptive"):
        margins = {budget_label("adaptive", norm, eps): (g[1] - b[1]) for (p, t, norm, eps), (b, _, g) in judged.items()
                   if p == "adaptive" and t == tag and b is not None and g is not None}
        low = min(margins, key=margins.get)
        lines.append(f"| adaptive, {tag}: FS+GSB accuracy >= base at every budget | {len(margins)} budgets, smallest margin "
                     f"{margins[low]:+.3f} ({low}) | {met(margins[low], -1e-9)} |")
        lines.append(f"| the same at l2 0.25: FS+GSB accuracy >= base + 0.2 | {margins['l2 0.25']:+.3f} | {met(margins['l2 0.25'], 0.2 - 1e-9)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("figures", "defense"), default="figures")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    folder = Path(args.results)
    if args.table == "defense":
        lines, judged, certified = defense_table(folder)
        print("\n".join(lines + [""] + defense_targets(judged, certified)))
        return
    print("| figure | value (min / median) | target | met? | command | machine | date |")
    print("|---|---|---|---|---|---|---|")
    for row in rows(folder):
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()

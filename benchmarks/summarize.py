"""Print the figures table of benchmarks/README.md from the JSON files the benchmark scripts wrote.

Each row: figure, value (min-based / median-based ratio where it is a timing), target, met?, the
command that printed it, the machine and the date (all read from the JSON, never typed by hand).

Usage: python benchmarks/summarize.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _bench import RESULTS


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    print("| figure | value (min / median) | target | met? | command | machine | date |")
    print("|---|---|---|---|---|---|---|")
    for row in rows(Path(args.results)):
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()

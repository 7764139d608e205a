"""Print the tables of benchmarks/README.md and README.md from the JSON files the benchmark scripts wrote.

`--table figures` (the default): benchmarks/README's figures. Each row: figure, value (min-based /
median-based ratio where it is a timing), target, met?, the command that printed it, the machine and the
date (all read from the JSON, never typed by hand).

`--table defense`: README's one table of what the defense buys on fs-mini-llava (base / FS / FS+GSB under
every protocol and budget, and the certificate), then the issue's targets with their verdicts. Every
cell comes from the result files named in its row; a row whose files disagree about a cell, or were run
at another sigma or n0, stops the script rather than mix them.

`--table readme`: README.md's small table (clean / transfer linf 16/255 / adaptive l2 0.25 / certified, base /
FS / FS+GSB, each with its count), a subset of the defense table's cells, checked the same way.

`--page results`: writes docs/results.md (the defense table with each run's provenance, the targets, the
sigma x n0 frontier, the performance figures) and its plots (PNG) under docs/img/, all from the result files.
A test regenerates the page and fails when the committed one differs.

Usage: python benchmarks/summarize.py [--table figures|defense|readme] [--page results [--docs docs]]
       [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
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
# bench_defense.py settings that older result files do not record, as those runs had them
SETTING_DEFAULTS = {"crop_views": 1, "crop_full_view": False}
ADAPTIVE_BUDGETS = (("l2", 0.0625), ("l2", 0.125), ("l2", 0.25), ("l2", 0.5), ("l2", 1.0),
                    ("linf", 1 / 255), ("linf", 2 / 255), ("linf", 4 / 255))
CROPS = {"crop_scale": [0.5, 1.0], "crop_views": 2, "crop_full_view": True, "transfer_step_size": 1 / 255, "surrogates": None}
SURROGATE_TAG = "surrogates"  # the paper's protocol (issue 32: base >= 0.5, FS+GSB <= 0.02), the others on the victim's own path
NOT_YET = ("fs", ("l2", 0.0625), ("l2", 0.5), ("l2", 1.0), ("linf", 1 / 255), ("linf", 2 / 255), ("linf", 4 / 255))


@dataclass(frozen=True)
class DefenseRun:
    """One run of the table: every cell must come from ``files`` (glob patterns; a checkpoint's rows.jsonl
    too), with ``settings`` as recorded there and ``n`` questions, except the cells ``not_run`` names."""

    protocol: str
    what: str  # what was run, as the table says it
    tag: str  # the run's short name in the targets
    budgets: tuple
    files: tuple
    settings: dict = field(default_factory=dict)
    n: int = 100
    not_run: tuple = ()  # (variant, budget, budget, ...): cells known not to exist yet

    def expected(self, variant: str, budget: tuple) -> bool:
        return not (self.not_run and variant == self.not_run[0] and budget in self.not_run[1:])


DEFENSE_RUNS = (
    DefenseRun("clean", "200 held-out questions", "clean", (("-", 0.0),), ("bench_defense_transfer100_cpu.json",), n=200),
    DefenseRun("transfer", "crafted once on base, replayed: targeted feature matching, whole view + one random crop per "
               "step, 200 steps at 1/255", "whole view + crop", (("linf", 4 / 255), ("linf", 8 / 255)),
               ("bench_defense_transfer100_linf4_crops200_fullview_cpu.json", "bench_defense_transfer100_linf8_crops200_fullview_cpu.json"),
               {**CROPS, "transfer_steps": 200}),
    DefenseRun("transfer", "the same, 300 steps", "whole view + crop, 300 steps", (("linf", 16 / 255),),
               ("bench_defense_transfer100_crops300_fullview_cpu.json",), {**CROPS, "transfer_steps": 300}),
    DefenseRun("transfer", "the same without crops, 100 steps at 2/255", "no crops, 100 steps", (("linf", 16 / 255),),
               ("bench_defense_transfer100_cpu.json",),
               {"crop_scale": None, "transfer_steps": 100, "transfer_step_size": 0.00784, "surrogates": None}),
    DefenseRun("transfer", "the paper's protocol: crafted on surrogates that are not the victim's tower (`synthetic`: three "
               "ResNets trained offline on the synthetic task), targeted feature matching, one random crop (0.5-0.9) per "
               "step, 300 steps at 1/255", SURROGATE_TAG, (("linf", 16 / 255),),
               ("bench_defense_synthetic_surrogates_cpu.json",),
               {"surrogates": ["synthetic"], "crop_scale": [0.5, 0.9], "crop_views": 1, "crop_full_view": False,
                "transfer_steps": 300, "transfer_step_size": 1 / 255}),
    DefenseRun("noise", "random signs of the budget: the control", "noise", (("linf", 4 / 255), ("linf", 8 / 255), ("linf", 16 / 255)),
               ("bench_defense_transfer100_crops300_step2_noise_cpu.json",)),
    DefenseRun("adaptive", "untargeted through each variant's smoothed path, 20 steps x EOT 8", "20 steps x EOT 8", ADAPTIVE_BUDGETS,
               ("bench_defense_adaptive100_20x8_gpu_partial/rows.jsonl", "bench_defense_adaptive100_*_20x8_gpu.json"),
               {"adaptive_steps": 20, "eot_samples": 8, "adaptive_objective": "untargeted"}, not_run=NOT_YET),
    DefenseRun("adaptive", "the same, 5 steps x EOT 2", "5 steps x EOT 2", ADAPTIVE_BUDGETS, ("bench_defense_adaptive100_*_5x2_cpu.json",),
               {"adaptive_steps": 5, "eot_samples": 2, "adaptive_objective": "untargeted"}),
)
CERTIFY_FILES = {"fs": "certify_photos_fs_mini_llava_cpu.json", "fs+gsb": "certify_photos_fs_gsb_mini_llava_cpu.json"}
CERTIFY_SETTINGS = {"sigma": DEFENSE_SIGMA, "n": 1000, "alpha": 0.001, "method": "bernstein", "normalize": "global"}
CERTIFY_DEFAULTS = {"normalize": "global"}  # not recorded by older `fs-mllm certify` summaries


def shipped_booster() -> str:
    """The fingerprint of the booster the package ships for fs-mini-llava, which every fs+gsb row must have used."""
    from fs_mllm import GaussianSmoothnessBooster
    from fs_mllm.defense import module_fingerprint
    from fs_mllm.models.mini_llava import BOOSTER_DIR

    return module_fingerprint(GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR).eval())


def result_rows(folder: Path, run: DefenseRun, pattern: str, booster: str) -> list[tuple[str, str, dict]]:
    """(file name, machine, row) of every row in the files matching ``pattern``, each file checked against the
    run's settings, sigma, n0 and the shipped booster (where it records one), so no cell mixes settings."""
    found = []
    for path in sorted(folder.glob(pattern)):
        if path.suffix == ".jsonl":  # a checkpoint: its settings sit beside it, the booster in its state rows
            recorded = json.loads((path.parent / "settings.json").read_text())
            settings, device = recorded["settings"], recorded["device_type"]
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows_ = [r for r in lines if "protocol" in r]
            boosters = {r["booster"] for r in lines if "protocol" not in r and r.get("booster")}
            name = path.parent.name + "/" + path.name
        else:
            record = json.loads(path.read_text())
            settings, rows_, name, device = record["settings"], record["rows"], path.name, record["device"]
            boosters = {record["booster"]} if record.get("booster") else set()
        fs = settings["fs"]
        if (fs["sigma"], fs["n_samples"]) != (DEFENSE_SIGMA, DEFENSE_N0):
            raise SystemExit(f"{name}: not at sigma {DEFENSE_SIGMA}, n0 {DEFENSE_N0} (sigma {fs['sigma']}, n0 {fs['n_samples']})")
        for key, want in run.settings.items():
            have = settings.get(key, SETTING_DEFAULTS.get(key))
            if have != want and not (isinstance(want, float) and isinstance(have, float) and abs(have - want) < 1e-9):
                raise SystemExit(f"{name}: {key} is {have!r}, but its row of the table says {want!r} ({run.what})")
        if boosters - {booster}:
            raise SystemExit(f"{name}: fs+gsb ran with booster {sorted(boosters - {booster})}, not the shipped one ({booster})")
        found += [(name, "cpu" if device == "cpu" else "gpu", r) for r in rows_]
    if not found:
        raise SystemExit(f"no defense rows in {folder}/{pattern}")
    return found


def defense_cells(folder: Path, run: DefenseRun, booster: str) -> tuple[dict, set[str]]:
    """{(variant, norm, eps): (n, accuracy, attack success, targeted success)} over the run's files, refusing
    two files that disagree about one cell, a cell missing or with another count, and the machines ("cpu",
    "gpu") the cells came from."""
    cells, devices = {}, set()
    wanted = {(norm, round(eps, 9)) for norm, eps in run.budgets}
    for pattern in run.files:
        for name, device, row in result_rows(folder, run, pattern, booster):
            key = (row["variant"], row["norm"], round(row["eps"], 9))
            if row["protocol"] != run.protocol or key[1:] not in wanted:
                continue
            figures = (row["n"], row["accuracy"], row["attack_success"], row["targeted_success"])
            if key in cells and cells[key][1] != figures:
                raise SystemExit(f"{run.protocol} {key}: {cells[key][0]} and {name} disagree ({cells[key][1]} vs {figures})")
            if row["n"] != run.n:
                raise SystemExit(f"{name}: {run.protocol} {key} counts {row['n']} questions, its row of the table {run.n}")
            cells.setdefault(key, (name, figures))
            devices.add(device)
    for variant in DEFENSE_VARIANTS:
        for norm, eps in run.budgets:
            have, expected = (variant, norm, round(eps, 9)) in cells, run.expected(variant, (norm, eps))
            if have != expected:
                raise SystemExit(f"{run.protocol} ({run.tag}) {variant} {budget_label(run.protocol, norm, eps)}: "
                                 + ("no result file has it" if expected else "now measured: take it out of not_run (and the "
                                                                              "README's sentence that it was not run)"))
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
        table, settings = record["summary"]["table"], record["summary"]["settings"]
        differ = {k: settings.get(k) for k, v in CERTIFY_SETTINGS.items() if settings.get(k, CERTIFY_DEFAULTS.get(k)) != v}
        if differ or settings.get("images") is not None or settings.get("limit") is not None:
            raise SystemExit(f"{name}: not certified on every offline photo with {CERTIFY_SETTINGS} ({differ or settings})")
        if (variant == "fs+gsb") != (settings.get("booster") is not None):
            raise SystemExit(f"{name}: booster {settings.get('booster')!r} does not fit the {variant} row")
        missing = {"FCSB@0.0625", "FCSB@0.125"} - set(table["columns"])
        if missing:
            raise SystemExit(f"{name}: no {sorted(missing)} column; certify again with --radii 0.0625,0.125")
        out[variant] = {c: sum(r[c] for r in table["rows"]) / len(table["rows"]) for c in ("FCSB@0.0625", "FCSB@0.125")}
        out[variant]["images"] = len(table["rows"])
    return out


def defense_table(folder: Path) -> tuple[list[str], dict, dict]:
    """README's one table (markdown lines), the cells the targets are judged on, and the certified means."""
    lines = ["| protocol | what was run | budget | n | machine | base | FS | FS+GSB | files |", "|---|---|---|---|---|---|---|---|---|"]
    judged = {}
    booster = shipped_booster()
    for run in DEFENSE_RUNS:
        cells, devices = defense_cells(folder, run, booster)
        machine = " and ".join(sorted(d.upper() for d in devices))
        for i, (norm, eps) in enumerate(run.budgets):
            figures = [cells.get((v, norm, round(eps, 9))) for v in DEFENSE_VARIANTS]
            judged[(run.protocol, run.tag, norm, round(eps, 9))] = figures
            first = i == 0  # later budgets of the same run: ditto
            lines.append(f"| {run.protocol} | {run.what if first else chr(34)} | {budget_label(run.protocol, norm, eps)} | "
                         f"{run.n} | {machine} | " + " | ".join(defense_cell(run.protocol, f) for f in figures) +
                         f" | {', '.join(f'`{x}`' for x in run.files) if first else chr(34)} |")
    certified = certified_means(folder)
    count = ", ".join(sorted({f"{c['images']} photos x {CERTIFY_SETTINGS['n']} samples" for c in certified.values()}))
    for i, column in enumerate(("FCSB@0.0625", "FCSB@0.125")):
        values = ["-"] + [f"{certified[v][column]:.3f}" if v in certified else "not run" for v in DEFENSE_VARIANTS[1:]]
        what = f"mean certified FCSB over the offline photos ({CERTIFY_SETTINGS['method']}, alpha {CERTIFY_SETTINGS['alpha']})"
        files = ", ".join(f"`{CERTIFY_FILES[v]}`" for v in certified)
        lines.append(f"| certified | {what if i == 0 else chr(34)} | l2 {column[5:]} | {count} | CPU | " + " | ".join(values) +
                     f" | {files if i == 0 else chr(34)} |")
    return lines, judged, certified


def defense_targets(judged: dict, certified: dict) -> list[str]:
    """The issue's targets at sigma 0.25 with the measured figures and whether each is met."""
    lines = ["| target (issue 12, sigma 0.25, n0 8) | measured | met? |", "|---|---|---|"]
    base, _, gsb = judged[("clean", "clean", "-", 0.0)]
    lines.append(f"| FS+GSB clean accuracy >= 0.95 x base | {gsb[1]:.3f} against 0.95 x {base[1]:.3f} = {0.95 * base[1]:.3f} | "
                 f"{met(gsb[1], 0.95 * base[1])} |")
    fcsb = certified.get("fs+gsb", {}).get("FCSB@0.125")
    if fcsb is not None:
        lines.append(f"| FS+GSB mean certified FCSB(sigma/2) >= 0.6 (offline photos, n {CERTIFY_SETTINGS['n']}, alpha "
                     f"{CERTIFY_SETTINGS['alpha']}) | {fcsb:.3f} | {met(fcsb, 0.6)} |")
    for (protocol, tag, norm, eps), (b, _, g) in judged.items():
        if protocol == "transfer" and eps == round(16 / 255, 9) and b is not None and g is not None:
            base_bar, gsb_bar = (0.5, 0.02) if tag == SURROGATE_TAG else (0.8, 0.03)
            lines.append(f"| transfer linf 16/255, {tag}: base attack success >= {base_bar:g}, and FS+GSB's <= {gsb_bar:g} | "
                         f"base {b[2]:.3f}, FS+GSB {g[2]:.3f} | {met(b[2], base_bar)}, {met(g[2], None, gsb_bar)} |")
    for tag in dict.fromkeys(t for p, t, _, _ in judged if p == "adaptive"):
        margins = {budget_label("adaptive", norm, eps): (g[1] - b[1]) for (p, t, norm, eps), (b, _, g) in judged.items()
                   if p == "adaptive" and t == tag and b is not None and g is not None}
        low = min(margins, key=margins.get)
        lines.append(f"| adaptive, {tag}: FS+GSB accuracy >= base at every budget | {len(margins)} budgets, smallest margin "
                     f"{margins[low]:+.3f} ({low}) | {met(margins[low], -1e-9)} |")
        lines.append(f"| the same at l2 0.25: FS+GSB accuracy >= base + 0.2 | {margins['l2 0.25']:+.3f} | {met(margins['l2 0.25'], 0.2 - 1e-9)} |")
    return lines


# ---------------------------------------------------------------------------------------------
# README's small table and the generated results page (docs/results.md)
# ---------------------------------------------------------------------------------------------

README_CELLS = (  # (label, run tag, budget): the runs of DEFENSE_RUNS the README's small table quotes
    ("clean accuracy", "clean", ("-", 0.0)),
    ("transfer linf 16/255 (crafted once on base: feature matching, whole view + crop, 300 steps), accuracy",
     "whole view + crop, 300 steps", ("linf", 16 / 255)),
    ("adaptive l2 0.25 (through each variant's smoothed path, 20 steps x EOT 8), accuracy", "20 steps x EOT 8", ("l2", 0.25)),
)
README_RADIUS = "FCSB@0.125"  # the certified row: mean certified FCSB at l2 sigma/2


def readme_table(folder: Path) -> list[str]:
    """README's small table: accuracy of base / FS / FS+GSB clean, under the transfer attack at linf 16/255 and
    the adaptive attack at l2 0.25, and the mean certified FCSB at l2 0.125, each row with its count."""
    booster = shipped_booster()
    runs = {run.tag: run for run in DEFENSE_RUNS}
    lines = ["| sigma 0.25, n0 8 | count | base | FS | FS+GSB |", "|---|---|---|---|---|"]
    for label, tag, (norm, eps) in README_CELLS:
        run = runs[tag]
        cells, devices = defense_cells(folder, run, booster)
        figures = [cells.get((v, norm, round(eps, 9))) for v in DEFENSE_VARIANTS]
        unit = "questions" if run.protocol == "clean" else "attacked questions"
        machine = " and ".join(sorted(d.upper() for d in devices))
        lines.append(f"| {label} | {run.n} {unit} ({machine}) | " +
                     " | ".join("not run" if f is None else f"{f[1]:.3f}" for f in figures) + " |")
    certified = certified_means(folder)
    counts = sorted({c["images"] for c in certified.values()})
    values = ["-"] + [f"{certified[v][README_RADIUS]:.3f}" if v in certified else "not run" for v in DEFENSE_VARIANTS[1:]]
    lines.append(f"| certified: mean FCSB at l2 {README_RADIUS[5:]} ({CERTIFY_SETTINGS['method']}, alpha "
                 f"{CERTIFY_SETTINGS['alpha']}) | {', '.join(map(str, counts))} photos x {CERTIFY_SETTINGS['n']} samples (CPU) | "
                 + " | ".join(values) + " |")
    return lines


def run_provenance(folder: Path, run: DefenseRun) -> list[str]:
    """One line per result file of a run: machine, dates, count, time, as the files record them."""
    out = []
    for pattern in run.files:
        for path in sorted(folder.glob(pattern)):
            if path.suffix == ".jsonl":
                recorded = json.loads((path.parent / "settings.json").read_text())
                device = recorded["device_type"]
                calls_path = path.parent / "calls.jsonl"
                calls = [json.loads(x) for x in calls_path.read_text().splitlines() if x.strip()] if calls_path.is_file() else []
                name, n, command = path.parent.name + "/" + path.name, None, None
                seconds = sum(c.get("seconds", 0) for c in calls) or None
            else:
                record = json.loads(path.read_text())
                device, calls, name = record["device"], record.get("calls", []), path.name
                n, seconds, command = record.get("attack_images"), record.get("seconds"), record.get("command")
            dates = sorted({c["date"][:10] for c in calls if c.get("date")})
            date = ", ".join(dates) if dates else "not recorded"
            count = f"{run.n} questions" + (f" ({n} attacked images)" if n and run.protocol != "clean" else "")
            time = f"{seconds:.0f} s" if seconds else "not recorded"
            how = f"`{command}`" if command else "`benchmarks/bench_defense.py` (flags not recorded; settings in the file)"
            out.append(f"| `{name}` | {how} | {device} | {date} | {count} | {time} |")
    return out


def budget_value(norm: str, eps: float) -> float:
    return eps * 255 if norm == "linf" else eps


def plot_defense(folder: Path, path: Path) -> None:
    """Accuracy vs budget per protocol (one panel per run and norm), base / FS / FS+GSB, from the result files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    booster = shipped_booster()
    clean, _ = defense_cells(folder, DEFENSE_RUNS[0], booster)
    panels = []
    for run in DEFENSE_RUNS[1:]:
        cells, _ = defense_cells(folder, run, booster)
        for norm in dict.fromkeys(n for n, _ in run.budgets):
            panels.append((run, norm, cells))
    columns = (len(panels) + 1) // 2
    fig, grid = plt.subplots(2, columns, figsize=(3.2 * columns, 6.4), sharey=True, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (run, norm, cells) in zip(axes, panels):
        budgets = [(n, e) for n, e in run.budgets if n == norm]
        for variant, style in zip(DEFENSE_VARIANTS, ("o-", "s-", "^-")):
            xs, ys = [0.0], [clean[(variant, "-", 0.0)][1]]
            for n, e in budgets:
                f = cells.get((variant, n, round(e, 9)))
                if f is not None:
                    xs.append(budget_value(n, e))
                    ys.append(f[1])
            ax.plot(xs, ys, style, label=variant.replace("fs", "FS").replace("gsb", "GSB"))
        ax.set_title(f"{run.protocol}: {run.tag}", fontsize=8)
        ax.set_xlabel("linf budget (x/255)" if norm == "linf" else "l2 budget ([0,1] pixels)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("accuracy (0 = clean, 200 questions)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def plot_certified(folder: Path, path: Path) -> None:
    """Mean certified FCSB over the offline photos vs the l2 radius, FS and FS+GSB, from the certify summaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant, name in CERTIFY_FILES.items():
        record = load(folder, name)
        if record is None:
            continue
        curve = record["summary"]["curve"]
        ax.plot(curve["radius"], curve["mean_bound"], label=f"{variant.replace('fs', 'FS').replace('gsb', 'GSB')} "
                f"({curve['num_images']} photos)")
    ax.set_xlabel("l2 radius ([0,1] pixels)")
    ax.set_ylabel("mean certified FCSB (-1 = none)")
    ax.set_title(f"sigma {DEFENSE_SIGMA}, n {CERTIFY_SETTINGS['n']}, {CERTIFY_SETTINGS['method']}, alpha {CERTIFY_SETTINGS['alpha']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


FRONTIER_FILE = "bench_frontier_cpu.json"


def frontier_section(folder: Path, plot: Path) -> list[str]:
    """The sigma x n0 clean-accuracy table from bench_frontier's merged result, and its plot."""
    record = load(folder, FRONTIER_FILE)
    if record is None:
        return []
    results = record["results"]
    n0s = sorted({int(k.split(",")[1]) for v in ("fs", "fs+gsb") for k in results.get(v, {})})
    sigmas = sorted({float(k.split(",")[0]) for v in ("fs", "fs+gsb") for k in results.get(v, {})})
    lines = [f"Clean accuracy on the first {record['questions']} held-out questions; base (unsmoothed) "
             f"{results['base']:.3f}.", "",
             "| sigma | variant | " + " | ".join(f"n0={n}" for n in n0s) + " |", "|---|---|" + "---|" * len(n0s)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sigma in sigmas:
        for variant in ("fs", "fs+gsb"):
            cells = [results.get(variant, {}).get(f"{sigma:g},{n}") for n in n0s]
            if all(c is None for c in cells):
                continue
            label = variant.replace("fs", "FS").replace("gsb", "GSB")
            lines.append(f"| {sigma:g} | {label} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
            ax.plot([n for n, c in zip(n0s, cells) if c is not None], [c for c in cells if c is not None], "o-",
                    label=f"{label}, sigma {sigma:g}")
    ax.axhline(results["base"], color="k", ls="--", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n0 (noisy copies per generate)")
    ax.set_ylabel("clean accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot, dpi=80, metadata={"Software": None})
    plt.close(fig)
    merged = "; ".join(f"`{Path(m['path']).name}` ({m['seconds']:.0f} s)" for m in record.get("merged_from", []))
    lines += ["", f"Provenance: `benchmarks/bench_frontier.py --questions {record['questions']}` (runs split over "
              f"processes and joined with `--merge`; per-run flags not recorded); file `{FRONTIER_FILE}`, merged from "
              f"{merged or 'one run'}; machine CPU (from the file name); date not recorded; {record['seconds']:.0f} s in all.",
              "", f"![sigma x n0 frontier](img/{plot.name})"]
    return lines


def results_page(folder: Path, docs: Path) -> str:
    """docs/results.md, and its PNGs under docs/img/."""
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    lines, judged, certified = defense_table(folder)
    out = ["# Results", "",
           "<!-- generated by `python benchmarks/summarize.py --page results` from benchmarks/results/*.json: do not edit; "
           "a test fails when this page and the files part -->", "",
           "Every figure on this page is read from `benchmarks/results/*.json` by `benchmarks/summarize.py`. "
           "Model: the embedded offline `fs-mini-llava`, on its own task (held-out synthetic questions), fp32.", "",
           "## What the defense buys", "",
           "Base / FS / FS+GSB at sigma 0.25, n0 8, under each protocol. Each cell is the accuracy on the "
           "attacked questions, then in brackets the attack success (the share of right answers turned wrong) and, "
           "for transfer, the targeted success. Base has no certificate. Read the transfer rows against the noise "
           "row of the same budget. See [Concepts](concepts.md#threat-models) for the two threat models.", ""]
    out += lines + [""] + defense_targets(judged, certified)  # `--table defense`, verbatim
    plot_defense(folder, img / "defense_accuracy.png")
    plot_certified(folder, img / "certified_curves.png")
    out += ["", "![accuracy vs budget per protocol](img/defense_accuracy.png)", "", "### Provenance", "",
            "Each result file the table reads, as the file records it (a field the file does not hold says so).", "",
            "| file | command | machine | date | count | time |", "|---|---|---|---|---|---|"]
    for run in DEFENSE_RUNS:
        out += run_provenance(folder, run)
    for variant, name in CERTIFY_FILES.items():
        record = load(folder, name)
        if record is not None:
            images = len(record["summary"]["table"]["rows"])
            time = f"{record['seconds_user']:.0f} s user CPU" if record.get("seconds_user") else "not recorded"
            out.append(f"| `{name}` | `{record['command']}` | {record['machine']} | {record['date']} | "
                       f"{images} photos x {record['summary']['settings']['n']} samples | {time} |")
    out += ["", "## Certified curves", "",
            "Mean certified FCSB of the decoder-facing features over the offline photos, against the l2 radius "
            "(files and commands: the provenance table above).", "", "![certified curves](img/certified_curves.png)"]
    frontier = frontier_section(folder, img / "frontier.png")
    if frontier:
        out += ["", "## Clean accuracy: the sigma x n0 frontier", ""] + frontier
    out += ["", "## Performance figures", "",
            "Each figure with the command that printed it, its machine and date (min / median over interleaved repeats "
            "where it is a timing). Details in `benchmarks/README.md`.", "",
            "| figure | value (min / median) | target | met? | command | machine | date |", "|---|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows(folder)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("figures", "defense", "readme"), default="figures")
    parser.add_argument("--page", choices=("results",), default=None, help="write docs/<page>.md (and its plots) instead")
    parser.add_argument("--docs", default=str(Path(__file__).resolve().parent.parent / "docs"), help="the docs folder")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    folder = Path(args.results)
    if args.page == "results":
        docs = Path(args.docs)
        (docs / "results.md").write_text(results_page(folder, docs), encoding="utf-8")
        print(docs / "results.md")
        return
    if args.table == "readme":
        print("\n".join(readme_table(folder)))
        return
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

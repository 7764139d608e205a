"""Shared helpers of the benchmark scripts: interleaved timing (min and median), machine line, JSON output,
comma-list options.

Every figure the benchmarks report is a ratio of two things timed side by side in one process, with
the repeats interleaved (A B C A B C ...), so load from other processes on a shared machine hits all
of them alike. The minimum is the least contended run; the median says how noisy the machine was.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

RESULTS = Path(__file__).resolve().parent / "results"


CLOCKS = ("cpu", "wall")


def int_list(text: str) -> list[int]:
    """A comma-separated option of integers ("100,1000")."""
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text: str) -> list[float]:
    """A comma-separated option of numbers ("0.0625,0.25")."""
    return [float(v) for v in text.split(",") if v.strip()]


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      clock: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` rounds, each round calling every callable once in turn.

    ``clock="cpu"``: this process's CPU time (``time.process_time``), ``"wall"``: ``time.perf_counter``.
    With one torch thread the CPU time is the compute the call costs; on a CPU shared with other jobs
    it is far steadier than wall time, which also counts the time other processes held the core.
    ``times.other`` (an attribute of the returned dict) holds the other clock's readings.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = TimesDict({name: [] for name in fns})
    times.other = {name: [] for name in fns}
    now, other_now = (time.process_time, time.perf_counter) if clock == "cpu" else (time.perf_counter, time.process_time)
    for _ in range(repeats):
        for name, fn in fns.items():
            start, other_start = now(), other_now()
            fn()
            times[name].append(now() - start)
            times.other[name].append(other_now() - other_start)
    return times


class TimesDict(dict):
    other: dict


def clock_function(clock: str) -> Callable[[], float]:
    return time.process_time if clock == "cpu" else time.perf_counter


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def ratio_of(num: list[float], den: list[float]) -> dict:
    """min/min and median/median of two interleaved series (the issue's min and median of a ratio)."""
    return {"min": min(num) / min(den), "median": statistics.median(num) / statistics.median(den)}


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num_i / den_i (same round = same machine load): min and median."""
    ratios = [a / b for a, b in zip(num, den)]
    return {"min": min(ratios), "median": statistics.median(ratios)}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{cpu}, {os.cpu_count()} cores shared with other jobs, {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}")


def write_json(name: str, payload: dict, out_dir: Path = RESULTS) -> Path:
    """Write ``payload`` plus the command, machine and UTC date to ``out_dir/name``; return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        # glibc's allocator settings change the memory figures, so a run made under them says so
        "command": " ".join([f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
                            + ["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **payload,
    }
    path = out_dir / name
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path


# CUDA runtime calls where the host blocks until the device has finished its queued work (a tensor read on
# the host, e.g. .item(), goes through one of these, so it is counted once)
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_call(run: Callable[[], object], device: str, rows: int, what: str, quiet: bool = False) -> dict:
    """torch.profiler over one call of ``run`` (warm it up first): the operators that take its time, by self
    time on the device that does the work, to say where a missed target goes. On a GPU also the share of
    the wall time the device was busy and how often the host waited on it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        start = time.perf_counter()
        run()
        wall = (time.perf_counter() - start) * 1e3  # ms, profiler overhead included
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = prof.key_averages()
    # ms of self time in all: on a GPU the kernels' own events only (an operator's self device time repeats
    # its kernels' time, so summing every event would count it twice), as torch's own table total does
    counted = [e for e in events if not on_gpu or (e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))]
    total = sum(getattr(e, sort_by) for e in counted) / 1e3
    table = events.table(sort_by=sort_by, row_limit=rows)
    if not quiet:
        print(f"profile of {what}, sorted by {sort_by} ({total:.1f} ms of self time in all, {wall:.1f} ms wall):\n{table}")
    result = {"sort_by": sort_by, "total_self_ms": total, "wall_ms": wall}
    if on_gpu:  # a GPU idles while the host waits on it and then launches the next kernels
        waits = {e.key: e.count for e in events if e.key in HOST_WAITS}
        if not quiet:
            print(f"  device busy {total / wall:.1%} of the wall time (profiler overhead included); host waits on the "
                  f"device, the benchmark's own final one included: {waits or 'none recorded'}")
        result.update(device_busy_share=total / wall, host_waits=waits)
    ranked = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, sort_by) / 1e3}
              for e in sorted(events, key=lambda e: getattr(e, sort_by), reverse=True)]
    return {**result, "top": ranked[:rows], "all": ranked, "table": table}

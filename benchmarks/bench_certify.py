"""Certification cost: throughput against the bare tower, memory as n grows, time vs n and batch size.

Three parts (``--parts``, all by default):

throughput  noisy samples per second of ``certify_model`` (n samples per image, ``--chunk-size``
            copies per tower call) / samples per second of the bare image-feature function (vision
            tower + projector, the model's own ``get_image_features``) called on the same number of
            copies per call, timed side by side with interleaved repeats (min and median).
            Target (issue 17): >= 0.95.
memory      peak resident memory of certification at each n of ``--memory-n``, each in a fresh
            subprocess: the child loads the model, certifies once at n = chunk size (so lazy
            allocations are made), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``),
            certifies at n and reads the new peak (VmHWM). Reported: the peak, the growth over the
            resident size just before certifying, and their ratios to the smallest n. tracemalloc
            cannot see torch's CPU allocations, hence RSS. Target: peak(10 000) / peak(100) <= 1.1.
scaling     certification time vs n (``--scaling-n``) at the default chunk size and vs chunk size
            (``--scaling-chunks``) at fixed n, with the bare tower's time for the same number of
            copies beside each point; plotted to benchmarks/results/certify_scaling_<model>_cpu.png.

``--compile`` (opt-in, with the throughput part; never with ``--quick``) adds, in the same process, the
eager vision tower vs a ``torch.compile``d copy of it (``--compile-backend``, inductor by default; if
that fails the error is printed verbatim and ``aot_eager`` is measured instead): the bare
image-feature function on one chunk and ``certify_model`` with each tower, interleaved, as speedups
eager / compiled (min and median). Compile and warm-up time is reported apart, and the compiled
tower's features are checked against eager's (max abs diff, cosine) along with the certificates.

``--profile`` (opt-in, with the throughput part) runs ``torch.profiler`` over one ``certify_model`` call
after a warm-up one and prints the operators that take its time (self time on the device doing the work:
CUDA kernels on a GPU), so a missed throughput target comes with where the time goes. The throughput
part's own breakdown (tower on the noisy copies / the engine with precomputed features / the clean
forward / the rest) is timed on every device.

Models: ``fs-mini-llava`` (real DINOv2 ViT-S/14 @ 112 px + SmolLM2, fp32), ``tiny`` (random-weight
LLaVA, CLIP 256x6 @ ``--image-size`` px), ``micro`` (the test suite's 32 px LLaVA: its tower costs so
little that this measures the bookkeeping), ``llava-7b-shape`` (LLaVA-1.5-7B-shaped random weights:
CLIP ViT-L/14-336 + Llama-7B; ``--device cuda --dtype bfloat16`` on a GPU).

Usage: python benchmarks/bench_certify.py [--model fs-mini-llava] [--parts throughput,memory,scaling] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from _bench import CLOCKS, RESULTS, int_list, interleaved_times, profile_call, ratio_of, summary, write_json
from fs_mllm import certify_model, patch_model
from fs_mllm.adapters import get_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(model_name: str, image_size: int, device: str, dtype: torch.dtype):
    """(model patched at sigma 0.25, processor-style inputs for one image, description)."""
    if model_name == "fs-mini-llava":
        from fs_mllm.models import load_mini_llava
        from fs_mllm.models.mini_llava import build_prompt
        from fs_mllm.synthetic import make_example

        model, processor = load_mini_llava(device=device, dtype=dtype)
        example = make_example(0, split="heldout", size=112)
        inputs = dict(processor(images=example.image, text=build_prompt(example.qa[0][0]), return_tensors="pt"))
        patch_model(model, sigma=0.25, processor=processor)
        return model, inputs, f"fs-mini-llava (DINOv2 ViT-S/14 @ 112px + SmolLM2-135M), {dtype_name(dtype)}"
    from fs_mllm.testing import llava_config

    if model_name == "tiny":
        config = llava_config(image_size=image_size, patch_size=14, vision_hidden=256, text_hidden=256,
                              vision_layers=6, text_layers=6)
        description = f"tiny LLaVA (random weights), CLIP 256x6 @ {image_size}px"
    elif model_name == "micro":
        config = llava_config()
        description = "micro LLaVA (the test suite's, random weights), CLIP 32x2 @ 32px"
    else:
        config = llava_7b_config()
        description = "LLaVA-1.5-7B-shaped random weights (CLIP ViT-L/14-336 + Llama-7B)"
    model, inputs = random_llava(config, device, dtype)
    patch_model(model, sigma=0.25, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, inputs, f"{description}, {dtype_name(dtype)}"


def random_llava(config, device: str, dtype: torch.dtype):
    """A random-weight LlavaForConditionalGeneration built directly on ``device`` in ``dtype`` (a 7B model
    never exists in fp32), and one image's inputs (certification reads only ``pixel_values``)."""
    from transformers import LlavaForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)
    return model, {"pixel_values": pixels.to(device=device, dtype=dtype)}


def llava_7b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=100,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_tower(model, inputs, copies: int, device: str):
    """The model's own image-feature function on ``copies`` noisy copies of the image per call."""
    from fs_mllm.patching import original_feature_function

    adapter = get_adapter(model)
    original = original_feature_function(model, adapter)
    kwargs = {k: getattr(model.config, k) for k in ("vision_feature_layer", "vision_feature_select_strategy")}
    pixels = inputs["pixel_values"].to(device=device, dtype=torch.float32)
    # noisy copies, as certification feeds the tower (sigma 0.25 in [0,1] space, std 0.5 normalised)
    noise = torch.randn((copies,) + tuple(pixels.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
    batch = (pixels + noise * 0.25 / 0.5).to(model.dtype)

    def run():
        with torch.inference_mode():
            original(pixel_values=batch, **kwargs)
        sync(device)

    return run


def certify(model, inputs, n: int, chunk: int, device: str):
    def run():
        certify_model(model, inputs, n=n, chunk_size=chunk)
        sync(device)

    return run


# ---- throughput --------------------------------------------------------------------------------

def engines_without_tower(model, inputs, n: int, chunk: int, device: str) -> dict[str, Callable[[], None]]:
    """The sampling engine's own work for n copies (noise draws, norms, scores) with an encoder that
    returns precomputed features of the right shape: what certification adds to the tower. Two runs over
    the same features: ``engine`` (certification's scores-only pass) and ``engine_with_mean`` (also the
    running mean of unit features, the pass certification made before), for the figure of what that saves."""
    from fs_mllm.patching import get_fs_state, original_feature_function
    from fs_mllm.smoothed_path import encoded_groups
    from fs_mllm.smoothing import monte_carlo_pass, unit_features

    adapter = get_adapter(model)
    state = get_fs_state(model)
    original = original_feature_function(model, adapter)
    pixels = inputs["pixel_values"].to(device=device, dtype=model.dtype)
    (_, x, encode), = list(encoded_groups(model, original, state, pixels, {}))
    with torch.inference_mode():
        clean = encode(x)
        features = clean.repeat(chunk, *([1] * (clean.ndim - 1)))
        reference, _ = unit_features(clean, state.config.normalize)
    noise_std = adapter.noise_std(state.config.sigma, state.image_std)

    def engine(mean: bool) -> Callable[[], None]:
        def run():
            with torch.inference_mode():
                monte_carlo_pass(lambda copies: features[: copies.shape[0]], x, noise_std, n, chunk_size=chunk,
                                 normalize=state.config.normalize, reference_unit=reference, mean=mean)
            sync(device)

        return run

    return {"engine": engine(False), "engine_with_mean": engine(True)}


def throughput(args, model, inputs) -> dict:
    n = args.throughput_chunks * args.chunk_size
    calls = args.throughput_chunks
    tower_call = bare_tower(model, inputs, args.chunk_size, args.device)

    def towers():  # the same number of copies as certify, in the same chunks: equal work, equal duration
        for _ in range(calls):
            tower_call()

    fns = {"certify": certify(model, inputs, n, args.chunk_size, args.device), "tower": towers,
           **engines_without_tower(model, inputs, n, args.chunk_size, args.device),
           "tower_1": bare_tower(model, inputs, 1, args.device)}
    times = interleaved_times(fns, args.repeats, clock=args.clock)
    other = times.other
    median = statistics.median
    cert_rate = [n / t for t in times["certify"]]
    tower_rate = [n / t for t in times["tower"]]
    fig = {"min": min(times["tower"]) / min(times["certify"]), "median": median(times["tower"]) / median(times["certify"])}
    other_fig = {"min": min(other["tower"]) / min(other["certify"]), "median": median(other["tower"]) / median(other["certify"])}
    print(f"throughput: certify_model n={n} (chunks of {args.chunk_size}) vs the bare tower on the same {calls} chunks, "
          f"{args.repeats} interleaved rounds, {args.clock} time")
    print(f"  certify  {max(cert_rate):9.1f} / {median(cert_rate):9.1f} samples/s (best / median)")
    print(f"  tower    {max(tower_rate):9.1f} / {median(tower_rate):9.1f} samples/s")
    print(f"  certify / tower throughput = {fig['min']:.3f} (best) / {fig['median']:.3f} (median)   target >= 0.95")
    print(f"  (the same on {[c for c in CLOCKS if c != args.clock][0]} time: {other_fig['min']:.3f} / {other_fig['median']:.3f})")
    result = {"n": n, "chunk_size": args.chunk_size, "rounds": args.repeats, "clock": args.clock,
              "ratio_other_clock": other_fig,
              "certify_samples_per_s": {"best": max(cert_rate), "median": median(cert_rate)},
              "tower_samples_per_s": {"best": max(tower_rate), "median": median(tower_rate)},
              "ratio": {**fig, "target": ">= 0.95"}}
    # where certification's time goes, as shares of its median time (on any device)
    total = median(times["certify"])
    parts = {"tower on the noisy copies": median(times["tower"]),
             "engine: noise draws, norms, scores": median(times["engine"]),
             "clean forward (1 copy, for f(x))": median(times["tower_1"])}
    parts["rest (model call wrapper, grouping, seeds, bounds)"] = total - sum(parts.values())
    print("  where certify_model's time goes (medians):")
    for key, value in parts.items():
        print(f"    {key:52s} {value * 1000:9.1f} ms  {value / total:6.1%}")
    result["breakdown_s"] = parts
    result["breakdown_share"] = {k: v / total for k, v in parts.items()}
    saved = ratio_of(times["engine_with_mean"], times["engine"])
    print(f"  engine with the running mean as well / scores only (certification's pass): {saved['min']:.3f} (min) / "
          f"{saved['median']:.3f} (median)")
    result["engine_with_mean_over_scores_only"] = saved
    return result


def profile_certify(args, model, inputs) -> dict:
    """torch.profiler over one ``certify_model`` call after a warm-up one, to say where a missed throughput
    target goes."""
    n = args.throughput_chunks * args.chunk_size
    run = certify(model, inputs, n, args.chunk_size, args.device)
    run()  # warm-up: allocations, kernel selection
    profiled = profile_call(run, args.device, args.profile_rows, f"one certify_model call, n={n}, batch {args.chunk_size}")
    del profiled["all"]  # the listed top operators are enough here
    return {"n": n, "chunk_size": args.chunk_size, **profiled}


# ---- torch.compile ------------------------------------------------------------------------------

def tower_slot(model):
    """(owner, attribute) of the vision tower module: ``model.model.vision_tower`` in every model built here."""
    owner = getattr(model, "model", model)
    if not isinstance(getattr(owner, "vision_tower", None), torch.nn.Module):
        raise ValueError(f"--compile: no vision_tower module on {type(model).__name__}")
    return owner, "vision_tower"


def compile_tower(eager, backend: str, probe) -> tuple:
    """torch.compile ``eager`` with ``backend`` and run ``probe`` once with it (compilation is lazy).

    Returns (compiled module, backend actually used, compile seconds {cpu, wall}, error text or None):
    when ``backend`` fails, the error is kept verbatim and ``aot_eager`` is compiled instead.
    """
    error = None
    for attempt in ([backend, "aot_eager"] if backend != "aot_eager" else [backend]):
        torch._dynamo.reset()
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            compiled = torch.compile(eager, backend=attempt)
            probe(compiled)
        except Exception as exc:  # noqa: BLE001 - the failure is the figure
            error = f"{type(exc).__name__}: {exc}"
            print(f"torch.compile(backend={attempt!r}) failed:\n{error}", flush=True)
            continue
        return compiled, attempt, {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}, error
    raise RuntimeError(f"torch.compile failed with every backend; last error: {error}")


def compile_comparison(args, model, inputs) -> dict:
    """Eager vs torch.compile'd vision tower, bare and inside certify_model, interleaved in one process."""
    from fs_mllm.patching import original_feature_function

    owner, name = tower_slot(model)
    eager = getattr(owner, name)
    n = args.throughput_chunks * args.chunk_size
    original = original_feature_function(model, get_adapter(model))
    kwargs = {k: getattr(model.config, k) for k in ("vision_feature_layer", "vision_feature_select_strategy")}
    pixels = inputs["pixel_values"].to(device=args.device, dtype=torch.float32)
    noise = torch.randn((args.chunk_size,) + tuple(pixels.shape[1:]), generator=torch.Generator().manual_seed(0))
    batch = (pixels + noise.to(args.device) * 0.25 / 0.5).to(model.dtype)

    def use(tower):
        setattr(owner, name, tower)

    def features(tower):
        use(tower)
        with torch.inference_mode():
            out = original(pixel_values=batch, **kwargs)
        sync(args.device)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.cat([o.reshape(o.shape[0], -1) for o in out]) if isinstance(out, (list, tuple)) else out

    try:
        compiled, backend, compile_s, error = compile_tower(eager, args.compile_backend, features)
        # the rest of the warm-up: certify_model also calls the tower on 1 copy (f(x)), a new shape
        cpu, wall = time.process_time(), time.perf_counter()
        use(compiled)
        cert_compiled = certify_model(model, inputs, n=n, chunk_size=args.chunk_size)
        sync(args.device)
        warmup_s = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
        use(eager)
        cert_eager = certify_model(model, inputs, n=n, chunk_size=args.chunk_size)
        ref, got = features(eager).float(), features(compiled).float()
        ref_flat, got_flat = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
        check = {"max_abs_diff": (got - ref).abs().max().item(), "max_abs_feature": ref.abs().max().item(),
                 "cosine_min": torch.nn.functional.cosine_similarity(got_flat, ref_flat).min().item(),
                 "score_lower_eager": [c.score_lower for c in cert_eager],
                 "score_lower_compiled": [c.score_lower for c in cert_compiled],
                 "score_mean_abs_diff": max(abs(a.score_mean - b.score_mean) for a, b in zip(cert_eager, cert_compiled))}

        def tower_with(tower):
            def run():
                use(tower)
                with torch.inference_mode():
                    original(pixel_values=batch, **kwargs)
                sync(args.device)
            return run

        def certify_with(tower):
            def run():
                use(tower)
                certify_model(model, inputs, n=n, chunk_size=args.chunk_size)
                sync(args.device)
            return run

        fns = {"tower_eager": tower_with(eager), "tower_compiled": tower_with(compiled),
               "certify_eager": certify_with(eager), "certify_compiled": certify_with(compiled)}
        times = interleaved_times(fns, args.repeats, clock=args.clock)
    finally:
        use(eager)
    speedup = {"tower": ratio_of(times["tower_eager"], times["tower_compiled"]),
               "certify": ratio_of(times["certify_eager"], times["certify_compiled"])}
    speedup_other = {"tower": ratio_of(times.other["tower_eager"], times.other["tower_compiled"]),
                     "certify": ratio_of(times.other["certify_eager"], times.other["certify_compiled"])}
    other_clock = [c for c in CLOCKS if c != args.clock][0]
    print(f"torch.compile (backend {backend!r}): compile + first call {compile_s['cpu']:.1f} s cpu / "
          f"{compile_s['wall']:.1f} s wall; first certify_model (recompiles for 1 copy) {warmup_s['cpu']:.1f} s cpu / "
          f"{warmup_s['wall']:.1f} s wall")
    print(f"  features compiled vs eager ({args.chunk_size} noisy copies): max |diff| {check['max_abs_diff']:.3g} "
          f"(max |feature| {check['max_abs_feature']:.3g}), min cosine {check['cosine_min']:.7f}; "
          f"certified S lower eager {check['score_lower_eager']} vs compiled {check['score_lower_compiled']}")
    for key, label in (("tower", f"bare tower, {args.chunk_size} copies"), ("certify", f"certify_model n={n}")):
        print(f"  speedup eager / compiled, {label:28s} {speedup[key]['min']:.3f} (min) / {speedup[key]['median']:.3f} "
              f"(median), {args.repeats} interleaved rounds, {args.clock} time "
              f"({other_clock} time: {speedup_other[key]['min']:.3f} / {speedup_other[key]['median']:.3f})")
    return {"backend": backend, "requested_backend": args.compile_backend, "error": error,
            "torch": torch.__version__, "n": n, "chunk_size": args.chunk_size, "rounds": args.repeats,
            "clock": args.clock, "compile_and_first_call_s": compile_s, "first_certify_s": warmup_s,
            "speedup_eager_over_compiled": speedup, "speedup_other_clock": speedup_other,
            "seconds": {k: summary(v) for k, v in times.items()}, "check": check}


# ---- memory ------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args, n: int) -> None:
    """Runs in a fresh process: print one JSON line with the peak RSS of certification at n."""
    model, inputs, _ = build(args.model, args.image_size, args.device, DTYPES[args.dtype])
    certify_model(model, inputs, n=args.chunk_size, chunk_size=args.chunk_size)  # warm-up: lazy allocations
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    certify_model(model, inputs, n=n, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    print(json.dumps({"n": n, "rss_before_kib": before, "peak_kib": _status_kib("VmHWM"), "peak_reset": reset,
                      "seconds": seconds}))


def memory(args) -> dict:
    rows = []
    for n in args.memory_n:
        command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--image-size", str(args.image_size),
                   "--chunk-size", str(args.chunk_size), "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(args.threads), "--memory-child", str(n)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child n={n} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["growth_kib"] = row["peak_kib"] - row["rss_before_kib"]
        rows.append(row)
        print(f"  n={n:6d}: peak RSS {row['peak_kib'] / 1024:8.1f} MiB, growth over the resident size before "
              f"certifying {row['growth_kib'] / 1024:7.1f} MiB ({row['seconds']:.1f} s)", flush=True)
    first, last = rows[0], rows[-1]
    ratio = last["peak_kib"] / first["peak_kib"]
    growth_ratio = last["growth_kib"] / max(first["growth_kib"], 1)
    print(f"memory: peak(n={last['n']}) / peak(n={first['n']}) = {ratio:.3f} (target <= 1.1); "
          f"growth ratio {growth_ratio:.3f} ({last['growth_kib'] - first['growth_kib']:+d} KiB)")
    return {"chunk_size": args.chunk_size, "rows": rows, "peak_ratio": ratio, "growth_ratio": growth_ratio,
            "target": "peak ratio <= 1.1"}


# ---- scaling -----------------------------------------------------------------------------------

def scaling(args, model, inputs, description: str) -> dict:
    by_n, by_chunk = [], []
    for n in args.scaling_n:
        times = interleaved_times({"certify": certify(model, inputs, n, args.chunk_size, args.device)},
                                  args.scaling_repeats, warmup=0, clock=args.clock)
        tower = interleaved_times({"tower": bare_tower(model, inputs, args.chunk_size, args.device)}, args.repeats,
                                  clock=args.clock)
        tower_n = min(tower["tower"]) * n / args.chunk_size
        by_n.append({"n": n, "seconds": summary(times["certify"]), "tower_seconds_for_n": tower_n})
        print(f"  n={n:6d}: certify {min(times['certify']):8.2f} s; bare tower on n copies {tower_n:8.2f} s", flush=True)
    n_fixed = args.scaling_fixed_n
    fns = {c: certify(model, inputs, n_fixed, c, args.device) for c in args.scaling_chunks}
    fns.update({f"tower_{c}": bare_tower(model, inputs, c, args.device) for c in args.scaling_chunks})
    times = interleaved_times(fns, args.scaling_repeats, clock=args.clock)
    for c in args.scaling_chunks:
        per_copy_tower = min(times[f"tower_{c}"]) / c
        by_chunk.append({"chunk_size": c, "seconds": summary(times[c]), "tower_seconds_for_n": per_copy_tower * n_fixed})
        print(f"  chunk {c:4d}: certify n={n_fixed} {min(times[c]):7.2f} s; bare tower {per_copy_tower * n_fixed:7.2f} s",
              flush=True)
    plot = plot_scaling(args, by_n, by_chunk, n_fixed, description)
    return {"by_n": by_n, "by_chunk_size": by_chunk, "fixed_n": n_fixed, "plot": plot}


def plot_scaling(args, by_n, by_chunk, n_fixed, description) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog([r["n"] for r in by_n], [r["seconds"]["min"] for r in by_n], "o-", label="certify_model")
    left.loglog([r["n"] for r in by_n], [r["tower_seconds_for_n"] for r in by_n], "k--", label="bare tower, n copies")
    left.set_xlabel("n (noisy samples per image)")
    left.set_ylabel(f"{args.clock} seconds (best of repeats)")
    left.set_title(f"time vs n (chunk {args.chunk_size})")
    left.legend()
    right.semilogx([r["chunk_size"] for r in by_chunk], [n_fixed / r["seconds"]["min"] for r in by_chunk], "o-",
                   label="certify_model")
    right.semilogx([r["chunk_size"] for r in by_chunk], [n_fixed / r["tower_seconds_for_n"] for r in by_chunk], "k--",
                   label="bare tower")
    right.set_xlabel("chunk size (copies per tower call)")
    right.set_ylabel("samples / s")
    right.set_title(f"throughput vs batch size (n={n_fixed})")
    right.legend()
    fig.suptitle(description, fontsize=9)
    fig.tight_layout()
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"certify_scaling_{args.model.replace('-', '_')}_cpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return str(path.relative_to(out_dir.parent)) if out_dir == RESULTS else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("fs-mini-llava", "tiny", "micro", "llava-7b-shape"), default="fs-mini-llava")
    parser.add_argument("--parts", default="throughput,memory,scaling")
    parser.add_argument("--image-size", type=int, default=224, help="tiny model resolution")
    parser.add_argument("--chunk-size", type=int, default=32, help="copies per tower call (the batch size)")
    parser.add_argument("--throughput-chunks", type=int, default=4, help="certify n = this x chunk size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-n", type=int_list, default=[100, 10000])
    parser.add_argument("--scaling-n", type=int_list, default=[100, 300, 1000, 3000, 10000])
    parser.add_argument("--scaling-chunks", type=int_list, default=[1, 4, 16, 32, 64])
    parser.add_argument("--scaling-fixed-n", type=int, default=256)
    parser.add_argument("--scaling-repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default="cpu",
                        help="process CPU time (steady on a shared CPU; the default) or wall time (use on a GPU)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--compile", action="store_true",
                        help="with the throughput part: also time a torch.compile'd vision tower against eager "
                             "(opt-in; compile takes ~30 s of wall time on a CPU; ignored with --quick)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--profile", action="store_true",
                        help="with the throughput part: also profile one certify_model call (torch.profiler, the "
                             "top operators by self time on the device) to show where its time goes")
    parser.add_argument("--profile-rows", type=int, default=15, help="operators listed by --profile")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (micro model, small n)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return memory_child(args, args.memory_child)
    if args.quick:
        args.model, args.chunk_size, args.throughput_chunks, args.repeats = "micro", 8, 2, 2
        args.memory_n, args.scaling_n, args.scaling_chunks, args.scaling_fixed_n = [16], [16, 32], [4, 8], 16
        args.compile = False  # the smoke run never compiles (seconds, not minutes)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    model, inputs, description = build(args.model, args.image_size, args.device, DTYPES[args.dtype])
    print(f"model: {description}; device {args.device}, {args.threads} thread(s)")
    if args.device != "cpu" and args.clock == "cpu":
        args.clock = "wall"  # GPU work does not show as this process's CPU time
    result = {"model": description, "device": args.device, "clock": args.clock}
    if "throughput" in parts:
        result["throughput"] = throughput(args, model, inputs)
        if args.profile:
            result["profile"] = profile_certify(args, model, inputs)
        if args.compile:
            result["compile"] = compile_comparison(args, model, inputs)
    if "memory" in parts:
        result["memory"] = memory(args)
    if "scaling" in parts:
        result["scaling"] = scaling(args, model, inputs, description)
    name = "quick" if args.quick else args.model.replace("-", "_")
    suffix = "cpu" if args.device == "cpu" else "gpu"
    tag = ("_compile" if args.compile else "") + ("_profile" if args.profile else "") if "throughput" in parts else ""
    write_json(f"certify_{name}_{'_'.join(parts)}{tag}_{suffix}.json", result,
               **({"out_dir": Path(args.out_dir)} if args.out_dir else {}))


if __name__ == "__main__":
    main()

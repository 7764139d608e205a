"""Cost of certified answers (issue 30): ``certify_answer`` against plain batched forwards of the same copies.

For one question, ``certify_answer`` decodes n0 + n noisy copies in chunks of ``--batch-size``. The baseline
is the work a plain pipeline would do on the same copies: the unpatched model's forward (closed set: one
prefill of prompt + image, ``logits_to_keep=1``) or greedy ``generate`` (open set), on batches of the same
size and count, on the same (clean) pixels. Both are timed side by side with interleaved repeats
(``_bench.interleaved_times``; min and median). Reported per mode:

- seconds per certified answer;
- noisy copies answered per second, certify / plain: the throughput ratio (issue 30 target: >= 0.9);
  certify pays for the noise, the [0,1] round trip and, closed set, one short continuation forward per
  multi-token candidate from the prefill's KV cache;
- decoder forwards per second of certify (prefills + continuations, or generate calls), for reference.

Models: ``micro`` (the test suite's random 32 px LLaVA; --quick), ``fs-mini-llava`` (real DINOv2 ViT-S/14 @
112 px + SmolLM2-135M, a synthetic held-out colour question, the six colours as candidates).

Usage: python benchmarks/bench_certify_answer.py [--model fs-mini-llava] [--modes closed,open] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _bench import CLOCKS, interleaved_times, ratio_of, summary, write_json
from fs_mllm import certify_answer, patch_model
from fs_mllm.adapters import get_adapter
from fs_mllm.patching import undefended


class WordTokenizer:
    """For the random micro model: token i <-> word "w<i>"."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{int(i)}" for i in row) for row in ids]


def build(model_name: str):
    """(patched model, inputs of one question, candidates, tokenizer, description)."""
    if model_name == "fs-mini-llava":
        from fs_mllm.models import load_mini_llava
        from fs_mllm.models.mini_llava import build_prompt
        from fs_mllm.synthetic import COLORS, make_example

        model, processor = load_mini_llava()
        example = make_example(0, split="heldout", size=112)
        question = next(q for q, answers in example.qa if answers[0] in COLORS)
        inputs = dict(processor(images=example.image, text=build_prompt(question), return_tensors="pt"))
        patch_model(model, sigma=0.25, processor=processor)
        return model, inputs, list(COLORS), processor.tokenizer, "fs-mini-llava (DINOv2 ViT-S/14 @ 112px + SmolLM2-135M), float32"
    from fs_mllm.adapters.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from fs_mllm.testing import build_llava

    model, inputs = build_llava(batch=1)
    patch_model(model, sigma=0.25, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs["pixel_values"] = get_adapter(model).pixels_to_model_inputs(model, images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)["pixel_values"]
    return model, inputs, ["w5", "w6 w7", "w8 w9 w10"], WordTokenizer(), "micro LLaVA (random weights), CLIP 32x2 @ 32px, float32"


def chunks(n0: int, n: int, batch: int) -> list[int]:
    sizes = []
    for total in (n0, n):
        sizes += [batch] * (total // batch) + ([total % batch] if total % batch else [])
    return sizes


def plain_runner(model, inputs, sizes: list[int], mode: str, max_new_tokens: int):
    """The unpatched model on the same chunk sizes of the same prompt and (clean) image."""
    prompt = {k: v for k, v in inputs.items()}
    cached = {k: {key: value.expand((k,) + tuple(value.shape[1:])) for key, value in prompt.items()} for k in set(sizes)}

    def run():
        with torch.inference_mode(), undefended(model):
            for k in sizes:
                if mode == "closed":
                    model(**cached[k], use_cache=True, logits_to_keep=1)
                else:
                    model.generate(**cached[k], do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("micro", "fs-mini-llava"), default="fs-mini-llava")
    parser.add_argument("--modes", default="closed,open")
    parser.add_argument("--n0", type=int, default=16)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default="cpu")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (micro model, small n)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.n0, args.n, args.batch_size, args.repeats, args.max_new_tokens = "micro", 4, 12, 8, 2, 2
    model, inputs, candidates, tokenizer, description = build(args.model)
    print(f"model: {description}; {args.threads} thread(s); n0={args.n0}, n={args.n}, batch {args.batch_size}")
    sizes = chunks(args.n0, args.n, args.batch_size)
    copies = args.n0 + args.n
    result = {"model": description, "clock": args.clock, "n0": args.n0, "n": args.n, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "modes": {}}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        forwards = []

        def certify():
            cert = certify_answer(model, inputs, candidates=candidates if mode == "closed" else None, tokenizer=tokenizer,
                                  n0=args.n0, n=args.n, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)[0]
            forwards.append(cert.extra["decoder_forwards"])
            return cert

        times = interleaved_times({"certify": certify, "plain": plain_runner(model, inputs, sizes, mode, args.max_new_tokens)},
                                  repeats=args.repeats, clock=args.clock)
        cert = certify()
        throughput = {"min": min(times["plain"]) / min(times["certify"]),
                      "median": ratio_of(times["plain"], times["certify"])["median"]}
        row = {
            "seconds_per_certified_answer": summary(times["certify"]),
            "plain_seconds_same_copies": summary(times["plain"]),
            "copies_per_second_certify": copies / min(times["certify"]),
            "copies_per_second_plain": copies / min(times["plain"]),
            "throughput_ratio_certify_over_plain": throughput,
            "decoder_forwards_per_answer": forwards[-1],
            "decoder_forwards_per_second_certify": forwards[-1] / min(times["certify"]),
            "plain_forwards_per_answer": len(sizes),
            "example_certificate": {k: v for k, v in cert.to_dict().items() if k != "extra"},
        }
        result["modes"][mode] = row
        print(f"{mode:>6}: {row['seconds_per_certified_answer']['min']:.3f} s per certified answer "
              f"(plain {row['plain_seconds_same_copies']['min']:.3f} s for the same {copies} copies); copies/s ratio "
              f"certify/plain min {throughput['min']:.3f}, median {throughput['median']:.3f}; "
              f"{row['decoder_forwards_per_second_certify']:.1f} decoder forwards/s ({forwards[-1]} per answer); "
              f"answer {cert.answer!r} radius {cert.radius:.3f}")
    name = "quick" if args.quick else args.model.replace("-", "_")
    write_json(f"certify_answer_{name}_cpu.json", result, **({"out_dir": Path(args.out_dir)} if args.out_dir else {}))


if __name__ == "__main__":
    main()

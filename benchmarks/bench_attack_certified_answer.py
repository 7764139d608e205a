"""The adaptive attack on certified answers through the real model (issue 30 item 4), on fs-mini-llava.

For each held-out synthetic colour question (the six colours as the closed set): ``certify_answer`` at
sigma, then ``attack_answer`` (SmoothAdv l2 PGD with EOT through each noisy copy's vision path, booster and
decoder) at ``--inside`` x the certified radius and at ``--beyond`` x it, then the smoothed classifier g at
the attacked image estimated with fresh noise (``predict_answer``, n ``--predict-n``, alpha). Inside the
radius a certified answer must never change (PREDICT gives it or abstains); beyond it the same attack
changing g shows it has teeth. Abstained questions are counted and not attacked.

Usage: python benchmarks/bench_attack_certified_answer.py [--variant fs+gsb] [--questions 8] [--out-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _bench import write_json
from fs_mllm.answer_certify import attack_answer, certify_answer, predict_answer


def questions(count: int, size: int) -> list[tuple[object, str, str]]:
    """(image, question, right colour) of the first ``count`` held-out images with a colour question."""
    from fs_mllm.synthetic import COLORS, make_example

    found, index = [], 0
    while len(found) < count:
        example = make_example(index, split="heldout", size=size)
        found += [(example.image, q, answers[0]) for q, answers in example.qa if answers[0] in COLORS][:1]
        index += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("fs", "fs+gsb"), default="fs+gsb")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--n0", type=int, default=20)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--predict-n", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--inside", type=float, default=0.95)
    parser.add_argument("--beyond", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eot-samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 question, n 10 at alpha 0.1, 1 step")
    args = parser.parse_args()
    if args.quick:
        # alpha 0.1: at n 10 a unanimous count certifies (at 0.001 it never can), so the attack path runs
        args.questions, args.n0, args.n, args.predict_n, args.steps, args.eot_samples, args.alpha = 1, 2, 10, 10, 1, 1, 0.1
    torch.set_num_threads(args.threads)

    from fs_mllm.config import FSConfig
    from fs_mllm.defense import apply_variant
    from fs_mllm.booster.model import GaussianSmoothnessBooster
    from fs_mllm.models import load_mini_llava
    from fs_mllm.models.mini_llava import BOOSTER_DIR, build_prompt
    from fs_mllm.synthetic import COLORS

    model, processor = load_mini_llava()
    booster = GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR).eval()
    apply_variant(model, args.variant, FSConfig(sigma=args.sigma), processor, booster)
    candidates = list(COLORS)
    common = dict(candidates=candidates, tokenizer=processor.tokenizer)
    rows, started = [], time.time()
    for number, (image, question, right) in enumerate(questions(args.questions, 112)):
        inputs = dict(processor(images=image, text=build_prompt(question), return_tensors="pt"))
        cert = certify_answer(model, inputs, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size,
                              seed=1, **common)[0]
        row = {"question": question, "right": right, "certificate": {k: v for k, v in cert.to_dict().items() if k != "extra"}}
        if not cert.abstained:
            for name, scale in (("inside", args.inside), ("beyond", args.beyond)):
                adv = attack_answer(model, inputs, [cert.answer], eps=scale * cert.radius, steps=args.steps,
                                    eot_samples=args.eot_samples, seed=5, **common)
                predicted = predict_answer(model, adv, n=args.predict_n, alpha=args.alpha, batch_size=args.batch_size,
                                           seed=99, **common)[0]
                row[name] = {"eps": scale * cert.radius, "predicted": predicted,
                             "changed": predicted not in (cert.answer, None), "abstained": predicted is None}
        rows.append(row)
        print(f"[{number + 1}/{args.questions}] {time.time() - started:.0f} s: {cert.answer} (right {right}) r "
              f"{cert.radius:.3f}; inside -> {row.get('inside', {}).get('predicted')}, beyond -> "
              f"{row.get('beyond', {}).get('predicted')}", flush=True)
    attacked = [r for r in rows if "inside" in r]
    summary = {
        "certified": len(attacked), "abstained": len(rows) - len(attacked),
        "certified_and_right": sum(r["certificate"]["answer"] == r["right"] for r in attacked),
        "inside_changed": sum(r["inside"]["changed"] for r in attacked),
        "inside_abstained": sum(r["inside"]["abstained"] for r in attacked),
        "beyond_changed": sum(r["beyond"]["changed"] for r in attacked),
        "beyond_abstained": sum(r["beyond"]["abstained"] for r in attacked),
    }
    print(f"{summary['certified']} of {len(rows)} certified; at {args.inside} x radius g changed on "
          f"{summary['inside_changed']} (PREDICT abstained on {summary['inside_abstained']}); at {args.beyond} x "
          f"radius changed on {summary['beyond_changed']} (abstained {summary['beyond_abstained']})")
    payload = {"settings": vars(args), "seconds": time.time() - started, "summary": summary,
               "rows": rows, "model": "fs-mini-llava (DINOv2 ViT-S/14 @ 112px + SmolLM2-135M), float32"}
    if args.out_dir:
        tag = "quick" if args.quick else args.variant.replace("+", "")
        write_json(f"attack_certified_answer_{tag}_cpu.json", payload, Path(args.out_dir))


if __name__ == "__main__":
    main()

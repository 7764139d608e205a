"""FS vs FS+GSB on fs-mini-llava: robustness score of the decoder-facing features and clean answers.

Prints, at sigma 0.25: mean S and mean certified FCSB(sigma/2) over real offline photos (certify_model,
n samples, alpha 0.001, bernstein), for FS and FS + the denoiser-only booster; and on held-out synthetic
questions the clean answers of base, GSB alone on the clean image (the booster's clean utility: it is
told the noise level it measures, ~0), FS and FS+GSB, with how many answers equal base's.

    python benchmarks/bench_mini_llava_gsb.py [--n 200] [--photos 6] [--questions 12] [--threads 1]
"""

import argparse
import time


import torch

from fs_mllm import GaussianSmoothnessBooster, certify_model, patch_model, unpatch_model
from fs_mllm.attacks import generate_text
from fs_mllm.evaluation.datasets import load_images
from fs_mllm.image_io import processor_size, to_tensor01
from fs_mllm.models import load_mini_llava
from fs_mllm.models.mini_llava import BOOSTER_DIR, build_prompt
from fs_mllm.synthetic import make_dataset, vqa_match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--photos", type=int, default=6)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor = load_mini_llava()
    booster = GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR)
    size = processor_size(processor)
    if size is None:
        raise SystemExit("the processor states no square input size")
    photos, _ = load_images(None, size, args.photos)
    examples = make_dataset(args.questions, split="heldout", size=size)
    images = torch.stack([to_tensor01(e.image, size) for e in examples])
    prompts = [build_prompt(e.qa[0][0]) for e in examples]
    answers = [e.qa[0][1] for e in examples]
    outputs = {"base": generate_text(model, processor, images, prompts, max_new_tokens=6)}
    with torch.no_grad():  # the denoiser-only booster on clean inputs, no smoothing
        level = booster.noise_level(images, args.sigma)
        boosted = booster.denoise(images, level)
    print(f"GSB on clean images: noise level told {level.max():.4f} (max), "
          f"max pixel change {(boosted - images).abs().max():.4f}")
    outputs["GSB"] = generate_text(model, processor, boosted, prompts, max_new_tokens=6)
    for name, chosen in (("FS", None), ("FS+GSB", booster)):
        patch_model(model, sigma=args.sigma, n_samples=8, processor=processor, booster=chosen)
        certificates = certify_model(model, photos, n=args.n, alpha=0.001)
        outputs[name] = generate_text(model, processor, images, prompts, max_new_tokens=6)
        unpatch_model(model)
        s = sum(c.score_mean for c in certificates) / len(certificates)
        bound = sum(max(float(c.fcsb(args.sigma / 2)), 0.0) for c in certificates) / len(certificates)
        print(f"{name:7s} mean S {s:.4f}  mean S_low {sum(c.score_lower for c in certificates) / len(certificates):.4f}  "
              f"mean FCSB(sigma/2) {bound:.4f} (vacuous counted as 0; {sum(c.fcsb(args.sigma / 2) < 0 for c in certificates)} vacuous)")
    for name, out in outputs.items():
        print(f"{name:7s} clean VQA accuracy {sum(vqa_match(o, a) for o, a in zip(out, answers)) / len(answers):.3f}")
    same = lambda a, b: sum(x.strip() == y.strip() for x, y in zip(outputs[a], outputs[b]))  # noqa: E731
    print(f"answers equal to base: GSB {same('GSB', 'base')}/{len(examples)}, FS {same('FS', 'base')}/{len(examples)}, "
          f"FS+GSB {same('FS+GSB', 'base')}/{len(examples)}; FS+GSB equal to FS {same('FS+GSB', 'FS')}/{len(examples)}; "
          f"sigma {args.sigma}, n {args.n}, {args.photos} photos, {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()

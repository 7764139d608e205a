"""Train a Gaussian Smoothness Booster around a frozen vision encoder, then evaluate it on held-out images.

Runs unchanged on CPU, one GPU or several:

    python recipes/train_gsb.py --output-dir runs/gsb_dinov2                     # CPU / one GPU
    accelerate launch recipes/train_gsb.py --output-dir runs/gsb_dinov2 --mixed-precision bf16

Kill it and rerun the same command to resume from ``OUTPUT_DIR/checkpoint`` (weights, AdamW state and
step count, all safetensors + JSON). Data: ``--images FOLDER``, ``--dataset NAME_OR_PATH`` (a
``datasets`` image dataset), or by default the offline real photos ``TRAIN_PHOTOS``; the held-out set is
``HELDOUT_PHOTOS`` (default) or the last ``--heldout-fraction`` of the folder/dataset images, never
trained on. The encoder is the real DINOv2 ViT-S/14 (``--encoder dinov2``) or a local Hugging Face vision
model folder; features are all patch tokens of the last hidden state (CLS dropped).

Clean utility: by default (``--noise-level estimated``) both stages are told the noise level measured
on each input, so a clean image is told ~0 and passes almost unchanged. With ``--noise-level given`` the
booster is told the smoothing sigma and cannot know an input is noise-free; there ``--clean-fraction``
(share of each batch fed without noise) and ``--clean-weight`` (their loss weight) set the trade-off
between S and cos(f_b(x), f(x)) on clean x. ``--init-from DIR`` fine-tunes a saved
booster of the same architecture (e.g. the shipped one) instead of starting from the identity.
Programmatic use: ``main(["--output-dir", ...])`` (``fs-mllm train-gsb`` calls it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fs_mllm.gsb import GaussianSmoothnessBooster, GSBConfig, boosted_encoder  # noqa: E402
from fs_mllm.gsb_training import (  # noqa: E402
    HELDOUT_PHOTOS, TRAIN_PHOTOS, GSBTrainConfig, PixelEncoder, evaluate_certificates, freeze, heldout_images,
    load_image_dataset, load_image_folder, offline_photo, resize_square, train_gsb,
)


def build_encoder(name: str) -> tuple[PixelEncoder, str]:
    """The frozen encoder ([0,1] pixels -> patch tokens) and its id for the booster config."""
    if name == "dinov2":
        from fs_mllm.models import load_dinov2
        from fs_mllm.models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD

        return freeze(PixelEncoder(load_dinov2(), IMAGENET_MEAN, IMAGENET_STD, drop_tokens=1)), "dinov2-vits14-imgfocus/patch_tokens"
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(name)
    model = AutoModel.from_pretrained(name)
    return freeze(PixelEncoder(model, processor.image_mean, processor.image_std, drop_tokens=1)), f"{name}/patch_tokens"


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``), train, save and evaluate (``fs-mllm train-gsb`` calls this)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="dinov2", help="'dinov2' or a local Hugging Face vision model folder")
    p.add_argument("--images", help="training image folder")
    p.add_argument("--dataset", help="datasets image dataset (name or load_from_disk path)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-column", default="image")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of folder/dataset images held out")
    p.add_argument("--size", type=int, default=112, help="training/eval resolution (multiple of the patch size)")
    p.add_argument("--sigma-min", type=float, default=0.2)
    p.add_argument("--sigma-max", type=float, default=0.55)
    p.add_argument("--denoiser-steps", type=int, default=200)
    p.add_argument("--mapper-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--denoiser-lr", type=float, default=1e-3)
    p.add_argument("--mapper-lr", type=float, default=1e-3)
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--stats-weight", type=float, default=0.1)
    p.add_argument("--clean-fraction", type=float, default=0.0,
                   help="share of each batch fed without noise (useful with --noise-level given; estimated levels keep clean inputs by design)")
    p.add_argument("--clean-weight", type=float, default=1.0, help="loss weight of the noise-free samples (noisy: 1)")
    p.add_argument("--identity-weight", type=float, default=1.0, help="stage 2: mapper identity ||M(z,0)||^2/||z||^2")
    p.add_argument("--init-from", help="start from this saved booster's weights (same architecture), e.g. to fine-tune")
    p.add_argument("--feature-every", type=int, default=1, help="stage 1: feature term every k-th step (0: MSE only)")
    p.add_argument("--mapper-cache-size", type=int, default=0, help="stage 2: encode this many crops once, train on them")
    p.add_argument("--mapper-batch-size", type=int, default=32)
    p.add_argument("--denoiser-channels", type=int, default=48)
    p.add_argument("--denoiser-depth", type=int, default=8)
    p.add_argument("--mapper-hidden", type=int, default=512)
    p.add_argument("--no-denoiser", action="store_true")
    p.add_argument("--no-mapper", action="store_true")
    p.add_argument("--noise-level", choices=["estimated", "given"], default="estimated",
                   help="level both stages are told: measured on each input (clean inputs pass ~unchanged) or the sigma given")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--save-to", help="also copy the final booster (gsb.safetensors + gsb_config.json) here")
    p.add_argument("--eval-n", type=int, default=100, help="Monte-Carlo samples per held-out certificate (0: skip)")
    p.add_argument("--eval-sigmas", type=float, nargs="+", default=[0.25, 0.5])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    encoder, encoder_id = build_encoder(args.encoder)
    if args.images or args.dataset:
        images = load_image_folder(args.images) if args.images else load_image_dataset(args.dataset, args.split, args.image_column)
        k = max(1, int(round(len(images) * args.heldout_fraction)))
        if len(images) <= k:
            raise ValueError(f"need more than {k} images to hold out {k}; got {len(images)}")
        train_images, held = images[:-k], torch.stack([resize_square(im, args.size) for im in images[-k:]])
        train_names, held_names = f"{len(train_images)} images of {args.images or args.dataset}", f"last {k}"
    else:
        train_images, held = [offline_photo(n) for n in TRAIN_PHOTOS], heldout_images(args.size)
        train_names, held_names = list(TRAIN_PHOTOS), list(HELDOUT_PHOTOS)

    with torch.no_grad():
        feature_dim = int(encoder(held[:1]).shape[-1])
    config = GSBConfig(
        feature_dim=feature_dim, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        use_denoiser=not args.no_denoiser, use_mapper=not args.no_mapper,
        denoiser_channels=args.denoiser_channels, denoiser_depth=args.denoiser_depth, mapper_hidden=args.mapper_hidden,
        encoder_id=encoder_id, image_size=args.size, noise_level=args.noise_level,
        extra={"train_images": train_names, "heldout_images": held_names},
    )
    torch.manual_seed(args.seed)
    booster = GaussianSmoothnessBooster(config)
    if args.init_from:
        init = GaussianSmoothnessBooster.from_pretrained(args.init_from)
        arch = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("extra", "encoder_id", "image_size")}
        if arch(init.config) != arch(config):
            raise ValueError(f"--init-from {args.init_from!r} has another architecture/sigma range: {arch(init.config)} vs {arch(config)}")
        booster.load_state_dict(init.state_dict())
        config.extra["init_from"] = str(args.init_from)
    train = GSBTrainConfig(
        denoiser_steps=args.denoiser_steps, mapper_steps=args.mapper_steps, batch_size=args.batch_size,
        denoiser_lr=args.denoiser_lr, mapper_lr=args.mapper_lr, feature_weight=args.feature_weight,
        stats_weight=args.stats_weight, clean_fraction=args.clean_fraction, clean_weight=args.clean_weight,
        identity_weight=args.identity_weight, image_size=args.size, seed=args.seed,
        feature_every=args.feature_every, mapper_cache_size=args.mapper_cache_size, mapper_batch_size=args.mapper_batch_size,
        checkpoint_every=args.checkpoint_every,
    )
    out = Path(args.output_dir)
    start = time.time()
    result = train_gsb(booster, encoder, train_images, train, output_dir=out, accelerator=accelerator)
    elapsed = time.time() - start
    if accelerator.is_main_process:
        booster.config.extra.update({"train_steps": result["step"], "train_seconds": round(result["seconds_total"], 1),
                                     "train_device": str(accelerator.device), "num_processes": accelerator.num_processes,
                                     "train_config": train.to_dict()})
        if args.save_to:
            booster.save_pretrained(args.save_to)
        accelerator.print(f"trained {result['step']} steps in {elapsed:.0f}s this run ({result['seconds_total']:.0f}s total)")

    if args.eval_n and accelerator.is_main_process:
        device = accelerator.device
        held = held.to(device)
        for sigma in args.eval_sigmas:
            before = evaluate_certificates(encoder, held, sigma, n=args.eval_n, chunk_size=50)
            after = evaluate_certificates(boosted_encoder(encoder, booster, sigma), held, sigma, n=args.eval_n, chunk_size=50, reference=encoder)
            mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
            summary = {
                "sigma": sigma, "n": args.eval_n,
                "S_before": mean(before, "score_mean"), "S_after": mean(after, "score_mean"),
                "fcsb_half_sigma_before": mean(before, "fcsb_half_sigma"), "fcsb_half_sigma_after": mean(after, "fcsb_half_sigma"),
                "clean_cos_boosted_vs_original": mean(after, "clean_cos_to_reference"),
            }
            accelerator.print(json.dumps(summary))
            (out / f"heldout_eval_sigma{sigma}.json").write_text(json.dumps({"summary": summary, "before": before, "after": after}, indent=1))


if __name__ == "__main__":
    main()

"""``fs-mllm train-gsb`` (and recipes/train_gsb.py): the booster training's command line, parsed into a
:class:`~fs_mllm.booster.run.BoosterTrainingRun` (whose fields hold the defaults) and run by
:func:`~fs_mllm.booster.run.run_booster_training`, the same call a Python user makes."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import torch

from ..arguments import (dataclass_from_args, existing_folder, fraction, image_size, non_negative_float, non_negative_int,
                         positive_float, positive_int, probability, settings_or_usage_error)
from ..booster.model import NOISE_LEVELS
from ..booster.run import MIXED_PRECISION, BoosterTrainingRun, run_booster_training

TRAIN_DESCRIPTION = """\
Train a Gaussian Smoothness Booster around a frozen vision encoder, then evaluate it on held-out images.

Runs unchanged on CPU, one GPU or several:

    fs-mllm train-gsb --output-dir runs/gsb_dinov2                                # CPU / one GPU
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
"""

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BoosterTrainingRun) if f.default is not dataclasses.MISSING}


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """Options named after BoosterTrainingRun's fields, with its defaults (``--no-denoiser`` and
    ``--no-mapper`` clear ``use_denoiser`` / ``use_mapper``); numbers checked by their ``type``."""
    p = argparse.ArgumentParser(prog=prog, description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(**{k: v for k, v in _DEFAULTS.items() if k not in ("use_denoiser", "use_mapper", "eval_sigmas")})
    p.add_argument("--encoder", help="'dinov2' or a local Hugging Face vision model folder")
    p.add_argument("--images", type=existing_folder, help="training image folder")
    p.add_argument("--dataset", help="datasets image dataset (name or load_from_disk path)")
    p.add_argument("--split")
    p.add_argument("--image-column")
    p.add_argument("--heldout-fraction", type=probability, help="share of folder/dataset images held out")
    p.add_argument("--size", type=image_size, help="training/eval resolution (multiple of the patch size)")
    p.add_argument("--sigma-min", type=positive_float)
    p.add_argument("--sigma-max", type=positive_float)
    p.add_argument("--denoiser-steps", type=non_negative_int)
    p.add_argument("--mapper-steps", type=non_negative_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--denoiser-lr", type=positive_float)
    p.add_argument("--mapper-lr", type=positive_float)
    p.add_argument("--feature-weight", type=non_negative_float)
    p.add_argument("--stats-weight", type=non_negative_float)
    p.add_argument("--clean-fraction", type=fraction,
                   help="share of each batch fed without noise (useful with --noise-level given; estimated levels keep clean inputs by design)")
    p.add_argument("--clean-weight", type=non_negative_float, help="loss weight of the noise-free samples (noisy: 1)")
    p.add_argument("--identity-weight", type=non_negative_float, help="stage 2: mapper identity ||M(z,0)||^2/||z||^2")
    p.add_argument("--init-from", type=existing_folder, help="start from this saved booster's weights (same architecture), e.g. to fine-tune")
    p.add_argument("--feature-every", type=non_negative_int, help="stage 1: feature term every k-th step (0: MSE only)")
    p.add_argument("--mapper-cache-size", type=non_negative_int, help="stage 2: encode this many crops once, train on them")
    p.add_argument("--mapper-batch-size", type=positive_int)
    p.add_argument("--denoiser-channels", type=positive_int)
    p.add_argument("--denoiser-depth", type=positive_int)
    p.add_argument("--mapper-hidden", type=positive_int)
    p.add_argument("--no-denoiser", action="store_true")
    p.add_argument("--no-mapper", action="store_true")
    p.add_argument("--noise-level", choices=NOISE_LEVELS,
                   help="level both stages are told: measured on each input (clean inputs pass ~unchanged) or the sigma given")
    p.add_argument("--checkpoint-every", type=positive_int)
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--save-to", help="also copy the final booster (gsb.safetensors + gsb_config.json) here")
    p.add_argument("--eval-n", type=non_negative_int, help="Monte-Carlo samples per held-out certificate (0: skip, else >= 2)")
    p.add_argument("--eval-sigmas", type=positive_float, nargs="+", default=list(_DEFAULTS["eval_sigmas"]))
    for action in p._actions:  # the defaults in the help, from the dataclass
        if action.dest in _DEFAULTS and action.option_strings and action.default is not None and "%(default)" not in (action.help or ""):
            action.help = (action.help + " " if action.help else "") + "(default: %(default)s)"
    return p


def run_from_args(args: argparse.Namespace) -> BoosterTrainingRun:
    return dataclass_from_args(BoosterTrainingRun, args, use_denoiser=not args.no_denoiser, use_mapper=not args.no_mapper)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``fs-mllm train-gsb`` and recipes/train_gsb.py: parse ``argv`` (default ``sys.argv[1:]``), train,
    save and evaluate on held-out images."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    run = settings_or_usage_error(parser, lambda: run_from_args(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    run_booster_training(run)
    return 0

"""``fs-mllm train-mapper``: fs-mini-llava's booster trained through the frozen language model, the
command line of :func:`fs_mllm.booster.through_lm.train_utility_booster` (its options are
:class:`~fs_mllm.booster.through_lm.UtilityTrainConfig`'s fields, with its defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Optional, Sequence

import torch

from ..arguments import (dataclass_from_args, non_negative_float, non_negative_int, positive_float, positive_int,
                         settings_or_usage_error)
from ..booster.through_lm import STAGES, UtilityTrainConfig, train_utility_booster
from ..models.mini_llava import BOOSTER_DIR

DESCRIPTION = ("Train a stage of fs-mini-llava's booster through the frozen language model and save the booster: "
               "the mapper (--stage mapper; the denoiser is kept from --init), the denoiser (--stage denoiser), or "
               "both together on the smoothed path with fresh noise every step (--stage joint).")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    defaults = UtilityTrainConfig()
    kinds = {"seed": non_negative_int, "identity_weight": non_negative_float, "consistency_weight": non_negative_float,
             "stats_weight": non_negative_float}
    for field in dataclasses.fields(UtilityTrainConfig):
        default = getattr(defaults, field.name)
        if field.name == "stage":
            parser.add_argument("--stage", choices=STAGES, default=default, help=f"booster stage to train (default {default})")
            continue
        kind = kinds.get(field.name, positive_int if isinstance(default, int) else positive_float)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=default, help=f"default {default}")
    parser.add_argument("--init", default=str(BOOSTER_DIR), help="booster to start from (default: the shipped one)")
    parser.add_argument("--output-dir", required=True, help="checkpoints (and the mapper stage's feature bank) go here; rerun to resume")
    parser.add_argument("--save-to", default=None, help="save the trained booster here (default OUTPUT_DIR/booster)")
    parser.add_argument("--threads", type=positive_int, default=1)
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``fs-mllm train-mapper``: parse, train (resuming from --output-dir), save, print the run's record."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    train = settings_or_usage_error(parser, lambda: dataclass_from_args(UtilityTrainConfig, args))
    torch.set_num_threads(args.threads)
    recipe = (prog or "fs-mllm train-mapper") + " " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    record = train_utility_booster(train, args.output_dir, init=args.init, save_to=args.save_to, recipe=recipe)
    print(json.dumps(record, indent=1))
    return 0

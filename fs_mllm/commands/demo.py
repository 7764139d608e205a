"""``fs-mllm demo``: the options of :class:`~fs_mllm.demo.DemoSettings` (its fields hold the defaults), checked
before the model loads, then :func:`fs_mllm.demo.run_demo`, the same call a Python user makes."""

from __future__ import annotations

import argparse
from typing import Any

from ..arguments import (add_fs_config_arguments, dataclass_from_args, positive_float, positive_int, sample_count,
                         settings_or_usage_error)
from ..config import ATTACK_EOT_SAMPLES, ATTACK_STEPS
from ..demo import DESCRIPTION, SHIPPED_ADAPTIVE_EXAMPLES, DemoSettings, run_demo  # noqa: F401  (DESCRIPTION: the --help text)

DEMO = DemoSettings()  # the defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_fs_config_arguments(parser, ("sigma", "n_samples", "alpha"))
    parser.add_argument("--examples", type=positive_int, default=DEMO.examples,
                        help=f"held-out synthetic images attacked by transfer and shown the noise control, one question "
                             f"each (default {DEMO.examples}: the shipped transfer images; another count crafts them)")
    parser.add_argument("--adaptive-examples", type=positive_int, default=DEMO.adaptive_examples,
                        help=f"the first of them attacked by the adaptive attack, and certified (default "
                             f"{SHIPPED_ADAPTIVE_EXAMPLES}, or --examples if fewer: {SHIPPED_ADAPTIVE_EXAMPLES} replays the "
                             "shipped adaptive images; other settings attack live)")
    parser.add_argument("--certify-n", type=sample_count, default=DEMO.certify_n,
                        help=f"Monte-Carlo samples per certificate, on the adaptive examples (default {DEMO.certify_n})")
    parser.add_argument("--transfer-steps", type=positive_int, default=DEMO.transfer_steps,
                        help=f"PGD steps crafting the transfer images (default {DEMO.transfer_steps}, the shipped "
                             "images; another count crafts them)")
    parser.add_argument("--eps-far", type=positive_float, default=DEMO.eps_far,
                        help=f"adaptive l2 budget far beyond the certified radius (default {DEMO.eps_far:g})")
    parser.add_argument("--steps", type=positive_int, default=DEMO.steps,
                        help=f"adaptive PGD steps (default {DEMO.steps}; the benchmark uses {ATTACK_STEPS})")
    parser.add_argument("--eot-samples", type=positive_int, default=DEMO.eot_samples,
                        help=f"noisy forwards per adaptive gradient (default {DEMO.eot_samples}; the benchmark uses {ATTACK_EOT_SAMPLES})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEMO.max_new_tokens,
                        help=f"answer length (default {DEMO.max_new_tokens})")
    parser.add_argument("--output-dir", default=DEMO.output_dir, help="where the report and plots go")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    return dataclass_from_args(DemoSettings, args)


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A bad combination of options (more adaptive examples than examples) is a usage error, before any work."""
    args.demo = settings_or_usage_error(parser, lambda: settings_from_args(args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_demo(args.demo)

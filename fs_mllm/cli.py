"""The ``fs-mllm`` command: one subcommand per module of ``fs_mllm/commands/``, dispatched from here.

``demo`` and ``certify`` have their options added to this parser (``fs-mllm --help`` lists them); ``attack``,
``eval vqa|caption``, ``train-gsb``, ``train-mapper`` and ``save`` hand the rest of the command line to the
``main(argv)`` of their module (the recipes in ``recipes/`` call the same ``main``), so the command and the
scripts never drift apart and the command works from a wheel."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .commands import certify as certify_command
from .commands import demo as demo_command

# name -> (module with main(*lead, argv, prog=...), leading arguments of main, help)
PACKAGE_COMMANDS = {
    "attack": ("fs_mllm.commands.attack", (), "PGD attacks on the full pipeline (base, FS, FS+GSB)"),
    "eval-vqa": ("fs_mllm.commands.eval", ("vqa",), "VQA robustness evaluation (same as `eval vqa`)"),
    "eval-caption": ("fs_mllm.commands.eval", ("caption",), "captioning robustness evaluation (same as `eval caption`)"),
    "train-gsb": ("fs_mllm.commands.train_gsb", (), "train a Gaussian Smoothness Booster"),
    "train-mapper": ("fs_mllm.commands.train_mapper", (), "train fs-mini-llava's booster through the frozen language model (--stage mapper or denoiser)"),
    "save": ("fs_mllm.commands.save", (), "patch a model (+ booster) and save it with fs_config.json and a model card"),
}
EVAL_TASKS = ("vqa", "caption")
# commands whose output folder a rerun of the same command resumes
RESUMABLE = ("attack", "eval", "eval-vqa", "eval-caption", "train-gsb", "train-mapper")


# ---------------------------------------------------------------------------------------------
# commands that live in package modules
# ---------------------------------------------------------------------------------------------

def run_package_command(name: str, argv: Sequence[str], prog: str) -> Any:
    """``main(*lead, argv, prog=prog)`` of the module that owns command ``name`` (imported on use, so
    ``fs-mllm --help`` stays quick)."""
    module, lead, _ = PACKAGE_COMMANDS[name]
    return importlib.import_module(module).main(*lead, list(argv), prog=prog)


def eval_task_parser() -> argparse.ArgumentParser:
    """``fs-mllm eval TASK``: picks the task; the task's own parser reads the options."""
    parser = argparse.ArgumentParser(prog="fs-mllm eval", usage="fs-mllm eval {vqa,caption} [options]",
                                     description="Robustness evaluation; `fs-mllm eval vqa --help` and "
                                                 "`fs-mllm eval caption --help` list the options.")
    parser.add_argument("task", choices=EVAL_TASKS, help="vqa (VQA accuracy) or caption (CIDEr, BLEU-4, ROUGE-L)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fs-mllm",
        description="Certified robustness for multimodal LLMs through feature-space smoothing (FS + FCSB + GSB).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="base / FS / FS+GSB on the embedded offline model, transfer and adaptive attacks (minutes on a CPU)",
                          description=demo_command.DESCRIPTION)
    demo_command.add_arguments(demo)
    demo.set_defaults(run=demo_command.run, check=lambda args, parser=demo: demo_command.check(parser, args))

    cert = sub.add_parser("certify", help="certify the features feeding the decoder, per image (FCSB curve + report); "
                                          "--answers: certify the model's answers (certified accuracy vs l2 radius)",
                          description=certify_command.CERTIFY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    certify_command.add_arguments(cert)
    cert.set_defaults(run=certify_command.run_certify, check=lambda args, parser=cert: certify_command.check_certify_arguments(parser, args))

    for name, (_, _, command_help) in PACKAGE_COMMANDS.items():
        sub.add_parser(name, help=command_help, add_help=False)
    sub.add_parser("eval", help="`fs-mllm eval vqa|caption ...`: robustness evaluation (`--help` after the task)",
                   add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """Run one command; returns its result (demo/certify: their results dict)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PACKAGE_COMMANDS:
        return run_package_command(argv[0], argv[1:], prog=f"fs-mllm {argv[0]}")
    if argv and argv[0] == "eval":
        task = eval_task_parser().parse_args(argv[1:2]).task
        return run_package_command(f"eval-{task}", argv[2:], prog=f"fs-mllm eval {task}")
    args = build_parser().parse_args(argv)
    if getattr(args, "check", None) is not None:
        args.check(args)  # usage errors (exit 2) that need more than one option, before anything loads
    return args.run(args)


def console_main() -> int:
    """The ``fs-mllm`` console script: exit status 0 on success.

    Why: ``main`` returns the run's results for Python callers; a console script's return value is
    its exit status, and a returned dict would exit 1 and be printed to stderr. Ctrl-C is not a crash:
    one line saying how to go on, exit status 130 (128 + SIGINT), no traceback. Bad input found while
    running (a ValueError or OSError: an unusable output folder, a damaged file, a value out of range)
    is a user error: its message, status 1; FS_MLLM_TRACEBACK=1 shows the traceback.
    """
    argv = sys.argv[1:]
    try:
        main(argv)
    except KeyboardInterrupt:
        resumable = bool(argv) and (argv[0] in RESUMABLE or (argv[0] == "certify" and "--answers" in argv))
        print("\ninterrupted" + ("; rerun the same command to resume" if resumable else ""), file=sys.stderr)
        return 130
    except Exception as exc:  # bad input found while running (a folder, a file, a value): no traceback
        from .results import ResultsFolderError

        if not isinstance(exc, (ValueError, OSError, ResultsFolderError)) or os.environ.get("FS_MLLM_TRACEBACK"):
            raise
        import traceback

        command = argv[0] if argv and not argv[0].startswith("-") else ""
        kind = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
        where = traceback.extract_tb(exc.__traceback__)[-1]  # kept for bug reports: a ValueError may be a bug
        print(f"fs-mllm {command}: error: {kind}{exc}".replace("  ", " "), file=sys.stderr)
        print(f"(raised at {Path(where.filename).name}:{where.lineno}; FS_MLLM_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(console_main())

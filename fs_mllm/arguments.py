"""Checks of command-line values and eval settings (numbers, radii, folders), each written once.

Why: a bad value must stop a command before anything is loaded or written. The ``check_*`` functions
raise ``ValueError`` naming the parameter (library callers, ``EvalSettings``); the argparse ``type=``
validators below are built from them, so ``argparse`` turns a bad value into exit status 2 with the
usage line, while parsing, i.e. before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from typing import Any, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (bools are not counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(value: Any, name: str, allow_zero: bool = False, below_one: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``; also < 1 with ``below_one``)."""
    if isinstance(value, bool):  # float(True) is 1.0: a flag passed where a number belongs
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    low = "0 <=" if allow_zero else "0 <"
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero) or (below_one and out >= 1):
        what = f"a number with {low} {name} < 1" if below_one else \
            f"a {'non-negative' if allow_zero else 'positive'} finite number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return out


def _argtype(convert: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse ``type=``: a ValueError becomes ArgumentTypeError (exit 2 with usage)."""

    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in its "invalid <name> value" message
    return parse


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"value must be an integer >= {minimum}, got {text!r}") from None
    return check_int(value, "value", minimum)


positive_int = _argtype(lambda text: _int(text, 1), "positive_int")
non_negative_int = _argtype(lambda text: _int(text, 0), "non_negative_int")
sample_count = _argtype(lambda text: _int(text, 2), "sample_count")  # Monte-Carlo samples: a bound needs >= 2
positive_float = _argtype(lambda text: check_float(text, "value"), "positive_float")
non_negative_float = _argtype(lambda text: check_float(text, "value", allow_zero=True), "non_negative_float")
probability = _argtype(lambda text: check_float(text, "value", below_one=True), "probability")  # in (0, 1)
fraction = _argtype(lambda text: check_float(text, "value", allow_zero=True, below_one=True), "fraction")  # [0, 1)


MIN_IMAGE_SIZE = 14  # pixels per side: the smallest patch of the supported towers
MAX_IMAGE_SIZE = 4096  # pixels per side: larger would need tens of GB per noisy batch


def check_image_size(value: Any, name: str) -> int:
    """An image side in pixels, MIN_IMAGE_SIZE..MAX_IMAGE_SIZE (bools are not sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ValueError(f"{name} must be an image side in pixels between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, got {value!r}")
    return value


def _image_size(text: str) -> int:
    return check_image_size(_int(text, MIN_IMAGE_SIZE), "value")


image_size = _argtype(_image_size, "image_size")


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"value must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{text!r} needs a CUDA GPU and a CUDA build of torch; this torch ({torch.__version__}) sees none: "
                         "use --device cpu")
    return text


device = _argtype(_device, "device")


def _radii(text: str) -> list[float]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(f"radii must be comma-separated non-negative l2 radii, got {text!r}")
    return [check_float(v, "each radius", allow_zero=True) for v in values]


radii = _argtype(_radii, "radii")


def _fraction_pair(text: str) -> tuple[float, float]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"expected 'lo,hi' (two area fractions, 0 < lo <= hi <= 1), got {text!r}")
    low, high = (check_float(v, "each fraction") for v in parts)
    if not low <= high <= 1:
        raise ValueError(f"expected 0 < lo <= hi <= 1, got {text!r}")
    return low, high


fraction_pair = _argtype(_fraction_pair, "fraction_pair")


def _folder(text: str) -> str:
    if not os.path.isdir(text):
        raise ValueError(f"{text!r} is not a folder")
    return text


existing_folder = _argtype(_folder, "existing_folder")


def add_crop_view_arguments(parser: argparse.ArgumentParser, default_views: int) -> None:
    """--crop-views and --crop-full-view: how many views each transfer crafting gradient averages
    (``default_views``: the settings class's default, AttackConfig's M-Attack 1)."""
    parser.add_argument("--crop-views", type=positive_int, default=default_views,
                        help="transfer only: forwards per crafting gradient, each its own random crop (M-Attack: 1, "
                             "the default); needs --crop-scale")
    parser.add_argument("--crop-full-view", action="store_true",
                        help="transfer only: the first of the --crop-views forwards sees the whole image, the view "
                             "the answer is judged on; needs --crop-views >= 2")


def add_fs_config_arguments(parser: argparse.ArgumentParser, names: Sequence[str] = ("sigma", "n_samples", "seed")) -> None:
    """Options ``--sigma``, ``--n-samples``, ... built from FSConfig's fields: the defaults and help text
    live on the dataclass (one place), and each value is checked by FSConfig's own validator while parsing."""
    from .config import FSConfig, _FIELD_CHECKS

    fields = {f.name: f for f in dataclasses.fields(FSConfig)}
    for name in names:
        f = fields[name]
        check = _FIELD_CHECKS[name]
        kind = typing.get_type_hints(FSConfig)[name]
        convert = int if kind in (int, Optional[int]) else (float if kind is float else str)
        parse = _argtype(lambda text, check=check, convert=convert: check(convert(text)), name)
        option = "--" + name.replace("_", "-")
        help_text = f.metadata.get("help", name) + ("" if f.default is None else f" (default {f.default})")
        if "choices" in f.metadata:
            parser.add_argument(option, default=f.default, choices=f.metadata["choices"], help=help_text)
        else:
            parser.add_argument(option, type=parse, default=f.default, help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """``cls`` built from the parsed options named like its fields (fields that were not options keep their
    defaults; ``fixed`` overrides both)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **fixed})


def fs_config_from_args(args: argparse.Namespace, **fixed: Any):
    """The FSConfig of the parsed options (fields that were not options keep FSConfig's defaults)."""
    from .config import FSConfig

    return dataclass_from_args(FSConfig, args, **fixed)


def settings_or_usage_error(parser: argparse.ArgumentParser, build: Callable[[], T]) -> T:
    """``build()``, the settings object of a command line; its ValueError (a bad value or combination, found
    by the settings' own checks) is a usage error (exit 2 before any work) naming the options."""
    try:
        return build()
    except ValueError as error:
        parser.error(as_options(str(error), parser))

# words of a library message that are also plain English, so never turned into options
_PLAIN_WORDS = frozenset({"model", "processor", "device", "question", "out", "attack", "help", "images", "seed",
                          "encoder", "dataset", "split", "size"})


def as_options(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message names fields (``target_image``); on the command line they are options
    (``--target-image``): the message with each of ``parser``'s option fields spelled as its option, except
    inside quotes (the values the user gave, e.g. a path) and inside paths or dotted names."""
    names = {a.dest: a.option_strings[-1] for a in parser._actions
             if a.option_strings and a.dest not in _PLAIN_WORDS and a.dest != "help"}
    if not names:
        return message
    pattern = re.compile(r"(?<![\w/.-])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")(?![\w/.-])")
    # quoted parts are values the user gave (paths, lists): they keep their words
    parts = re.split(r"('[^']*'|\"[^\"]*\")", message)
    return "".join(part if i % 2 else pattern.sub(lambda m: names[m.group(1)], part) for i, part in enumerate(parts))

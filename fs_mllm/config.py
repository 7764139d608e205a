"""FSConfig: every setting of feature-space smoothing in one validated, JSON-serialisable place.

The ``check_*`` validators below are the only ones: every public entry point (smoothing, certification,
patching, attacks, boosters) calls them, so a bad value gets the same ValueError naming the parameter
wherever it is passed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

NORMALIZE_MODES = ("global", "token")
DEFAULT_NORMALIZE = "global"  # one unit vector per image (FSConfig.normalize)
BOUND_METHODS = ("hoeffding", "bernstein", "betting", "betting_fixed")
# Noise std in [0,1] pixel space above which smoothing is pure noise (at sigma = 10 the image is 1% of
# the input's scale); larger values only overflow float32 and certify nothing.
SIGMA_MAX = 10.0
# torch.Generator.manual_seed takes a signed 64-bit integer; negative seeds are refused for clarity.
SEED_LIMIT = 2**63
DEFAULT_CHUNK_SIZE = 32  # noisy copies per encoder call when chunk_size is None (a memory knob; results do not depend on it)
DEFAULT_GENERATE_BATCH = 16  # generate_text: prompts per generate() (a smoothed variant encodes n0 copies of each image)
# Attack strength, side by side: what each entry point runs unless told otherwise. The adaptive attack of record
# (AttackConfig, the defense table) is the weakest worth believing; the commands and the demo run weaker ones to
# answer in minutes (their --help names the benchmark's), and a figure always states the steps and EOT it ran.
ATTACK_STEPS = 20  # AttackConfig and the defense table's adaptive rows: PGD steps
ATTACK_EOT_SAMPLES = 8  # ... and noisy forwards per gradient (also fs-mllm attack's)
TRANSFER_STEPS = 300  # the transfer protocol's crafting (M-Attack's 300 steps at linf 16/255)
COMMAND_ATTACK_STEPS = 10  # fs-mllm attack and fs-mllm eval: PGD steps
EVAL_EOT_SAMPLES = 1  # fs-mllm eval: noisy forwards per gradient on the FS variants
DEMO_ATTACK_STEPS = 2  # fs-mllm demo's adaptive rows (minutes on a CPU)
DEMO_EOT_SAMPLES = 2
DEMO_FAR_L2 = 1.0  # fs-mllm demo: the adaptive l2 budget far beyond any certified radius
DEMO_CERTIFY_N = 100  # fs-mllm demo: Monte-Carlo samples per certificate (minutes on a CPU)
ATTACK_ANSWER_TOKENS = 20  # fs-mllm attack and generate_text: tokens generated per answer
DEFENSE_ANSWER_TOKENS = 6  # the defense table and the demo: tokens per answer (the synthetic task's answers are one word)
ANSWER_ATTACK_STEPS = 10  # attack_answer: l2 PGD steps on the smoothed classifier g
ANSWER_ATTACK_EOT_SAMPLES = 16  # ... and noisy copies per gradient (its soft vote needs more than a feature attack)
UTILITY_BOOSTER_STEPS = 600  # booster.through_lm: optimiser steps of the booster trained through the language model


def _real(value: Any, name: str, what: str) -> float:
    """A real number (Python or numpy) as float; bool, strings and None are refused (``True`` is not a sigma)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_sigma(sigma: Any, name: str = "sigma") -> float:
    """sigma is the Gaussian noise std in [0,1] pixel space: a finite number in (0, SIGMA_MAX]."""
    what = f"a positive finite number <= {SIGMA_MAX:g} (noise std in [0,1] pixel space)"
    value = _real(sigma, name, what)
    if not math.isfinite(value) or not 0 < value <= SIGMA_MAX:
        raise ValueError(f"{name} must be {what}, got {sigma!r}")
    return value


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    what = "a number in (0, 1) (failure probability of the certificate)"
    value = _real(alpha, name, what)
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be {what}, got {alpha!r}")
    return value


def check_n(n: Any, name: str = "n", minimum: int = 2, what: str = "number of Monte-Carlo noise samples") -> int:
    """Monte-Carlo sample counts: a certificate's statistics need ``n >= 2``; the copies averaged inside
    ``generate`` (n0) may be 1 (one noisy copy: an unbiased but high-variance estimate of the smoothed features).
    Other counts name what they count in ``what``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}), got {n!r}")
    return n


def check_seed(seed: Any, name: str = "seed") -> int:
    """Seeds go to torch.Generator.manual_seed, which takes 0 <= seed < 2**63 here."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer with 0 <= {name} < 2**63 (seed of the noise generator), got {seed!r}")
    return seed


def check_choice(value: Any, name: str, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_chunk_size(chunk_size: Any) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive integer (noisy copies per encoder call), got {chunk_size!r}")
    return chunk_size


def _json_type_ok(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a field annotation? bool is not int/float, int is a float, None only for Optional."""
    if hint is Any:
        return True
    if typing.get_origin(hint) is typing.Union:
        return any(_json_type_ok(value, arg) for arg in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def _json_type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_json_type_name(arg) for arg in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def dataclass_from_dict(cls: type, data: Any) -> Any:
    """Build a config dataclass from JSON data: the one strict loader of FSConfig and GSBConfig.

    Refuses unknown fields (a typo must not be ignored), missing required fields and values of the
    wrong JSON type (``"false"`` or ``true`` where a number is expected), each naming the field.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} data must be a JSON object (dict of fields), got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(fields)}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{cls.__name__} fields {missing} are required but missing")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _json_type_ok(value, hints[name]):
            raise ValueError(f"{cls.__name__} field {name} must be {_json_type_name(hints[name])}, got {value!r} ({type(value).__name__})")
    return cls(**data)


class _CheckedConfig:
    """A settings dataclass whose every field is checked on construction and on assignment (``_CHECKS``), and
    that round-trips through JSON: the shared behaviour of FSConfig and CertifyConfig."""

    _CHECKS: typing.ClassVar[dict] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        check = self._CHECKS.get(name)
        super().__setattr__(name, check(value) if check is not None else value)

    def to_dict(self) -> dict:
        """The config as JSON-serialisable data.

        Returns:
            {field name: value}, what ``from_dict`` reads back.
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        """Build a config from JSON data, strictly.

        Args:
            data: {field name: value}; fields left out take their defaults.

        Returns:
            The validated config.

        Raises:
            ValueError: ``data`` is not a dict, names an unknown field, or holds a value of the wrong JSON
                type (``"0.25"``, ``true`` for a number) or out of range.
        """
        return dataclass_from_dict(cls, data)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (this config is left as it is).

        Args:
            **changes: fields and their new values, e.g. ``config.replace(alpha=0.01)``.

        Returns:
            The new, validated config.

        Raises:
            ValueError: a new value out of range.
            TypeError: a name that is not a field.
        """
        return dataclasses.replace(self, **changes)


@dataclass
class CertifyConfig(_CheckedConfig):
    """How a certificate is estimated: the one home of the defaults that every certifying entry point takes
    (``certify_features``, ``certify_model``, ``certify_prediction``, ``certify_zero_shot``, ``certify_answer``,
    ``fs-mllm certify``, the defense table, the booster's held-out check). FSConfig's ``alpha`` and ``method``
    default to these too, so a patched model certifies as the functions do.

    Attributes:
        n: Monte-Carlo samples per certificate, >= 2 (DESIGN.md section 2: n = 1000). Default 1000.
        alpha: failure probability of a certificate, in (0, 1). Default 0.001.
        method: lower confidence bound on the robustness score (``fs_mllm.stats``): "hoeffding", "bernstein"
            (default), "betting" or "betting_fixed".
        n0: certified answers: the noisy copies that select the answer before the ``n`` that certify it, >= 1
            (and at most ``n``, checked where answers are certified: feature certificates use no n0).
            Default 100 (Cohen et al.).
        max_new_tokens: certified answers, open set: tokens greedily decoded per noisy copy, >= 1. Default 10.

    Raises:
        ValueError: a field of the wrong type or out of range (naming the field), on construction or assignment.
    """

    n: int = 1000
    alpha: float = 0.001
    method: str = "bernstein"
    n0: int = 100
    max_new_tokens: int = 10

    _CHECKS: typing.ClassVar[dict] = {
        "n": check_n,
        "alpha": check_alpha,
        "method": lambda value: check_choice(value, "method", BOUND_METHODS),
        "n0": lambda value: check_n(value, "n0", minimum=1),
        "max_new_tokens": lambda value: check_n(value, "max_new_tokens", 1, "tokens greedily decoded per noisy copy"),
    }


_FIELD_CHECKS = {
    "sigma": check_sigma,
    "n_samples": lambda value: check_n(value, "n_samples", minimum=1),
    "chunk_size": check_chunk_size,
    "seed": check_seed,
    "normalize": lambda value: check_choice(value, "normalize", NORMALIZE_MODES),
    "alpha": check_alpha,
    "method": lambda value: check_choice(value, "method", BOUND_METHODS),
    "smooth_video": lambda value: check_bool(value, "smooth_video"),
}


@dataclass
class FSConfig(_CheckedConfig):
    """Settings of feature-space smoothing: what ``patch_model`` runs and what certificates default to.

    Every field is validated on construction and on assignment, so a config is never invalid;
    ``to_dict``/``from_dict`` round-trip it through JSON (fs_config.json holds one).

    Attributes:
        sigma: Gaussian noise std in [0,1] pixel space (the model's input resolution, before mean/std
            normalisation), in (0, 10] (``SIGMA_MAX``: beyond 10 a noisy copy is pure noise). Default 0.25.
        n_samples: noisy copies averaged per image inside ``generate`` (n0), an integer >= 1. Default 8.
        chunk_size: noisy copies per encoder call, a memory knob (None = 32); the noise drawn does not
            depend on it.
        seed: seed of the noise, 0 <= seed < 2**63; each image's stream is derived from it and the image's
            pixels, so the same seed and image give the same noise in any batch.
        normalize: "global" (one unit vector per image) or "token" (each visual token normalised, and
            certified, on its own).
        alpha: failure probability of a certificate, in (0, 1). Default 0.001.
        method: lower confidence bound on the robustness score: "hoeffding", "bernstein" (default),
            "betting" or "betting_fixed" (see ``fs_mllm.score_lower_bound``).
        smooth_video: also smooth the video frames that reach the image-feature function (Qwen3-VL,
            Qwen3.5, GLM-4.1V, Kimi-K2.5, ...), each frame with its own noise. Default False: videos pass
            through unsmoothed (the certificate is about images).

    Raises:
        ValueError: a field of the wrong type or out of range (naming the field), on construction or
            assignment.
    """

    sigma: float = field(default=0.25, metadata={"help": "smoothing noise std in [0,1] pixel space"})
    n_samples: int = field(default=8, metadata={"help": "noisy copies averaged inside generate() (n0)"})
    chunk_size: Optional[int] = field(default=None, metadata={"help": "noisy copies per encoder call (memory knob; default 32)"})
    seed: int = field(default=0, metadata={"help": "seed of the smoothing noise (same seed, same result)"})
    normalize: str = field(default=DEFAULT_NORMALIZE, metadata={"help": "global: one unit vector per image; token: per visual token",
                                                       "choices": NORMALIZE_MODES})
    alpha: float = field(default=CertifyConfig.alpha, metadata={"help": "certificate failure probability"})
    method: str = field(default=CertifyConfig.method, metadata={"help": "lower confidence bound on the robustness score",
                                                       "choices": BOUND_METHODS})
    smooth_video: bool = field(default=False, metadata={"help": "also smooth video frames that reach the image-feature "
                                                                "function (default: videos pass through unsmoothed)"})

    _CHECKS: typing.ClassVar[dict] = _FIELD_CHECKS

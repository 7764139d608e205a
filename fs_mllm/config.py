"""FSConfig: every setting of feature-space smoothing in one validated, JSON-serialisable place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

NORMALIZE_MODES = ("global", "token")
BOUND_METHODS = ("hoeffding", "bernstein", "betting")


def check_sigma(sigma: Any, name: str = "sigma") -> float:
    """sigma is the Gaussian noise std in [0,1] pixel space; it must be a positive finite number."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number (noise std in [0,1] pixel space), got {sigma!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number (noise std in [0,1] pixel space), got {sigma!r}")
    return value


def check_alpha(alpha: Any) -> float:
    value = float(alpha)
    if not (0.0 < value < 1.0) or not math.isfinite(value):
        raise ValueError(f"alpha must lie in (0, 1) (failure probability of the certificate), got {alpha!r}")
    return value


def check_n(n: Any, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"{name} must be an integer >= 2 (number of Monte-Carlo noise samples), got {n!r}")
    return n


def check_choice(value: Any, name: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def dataclass_from_dict(cls: type, data: dict) -> Any:
    """Build a config dataclass from JSON data, refusing unknown fields (a typo must not be ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**data)


def check_chunk_size(chunk_size: Any) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive integer (noisy copies per encoder call), got {chunk_size!r}")
    return chunk_size


@dataclass
class FSConfig:
    """Settings of feature-space smoothing.

    sigma: noise std in [0,1] pixel space. n_samples: noisy copies averaged per forward (n0, small,
    used inside ``generate``). chunk_size: noisy copies per encoder call (memory knob; None = 32).
    seed: seed of the noise generator (same seed, same result). normalize: "global" (one unit vector
    per image) or "token" (each visual token normalised and certified on its own). alpha, method:
    confidence and bound used when certifying.
    """

    sigma: float = 0.25
    n_samples: int = 8
    chunk_size: Optional[int] = None
    seed: int = 0
    normalize: str = "global"
    alpha: float = 0.001
    method: str = "bernstein"

    def __post_init__(self) -> None:
        self.sigma = check_sigma(self.sigma)
        self.n_samples = check_n(self.n_samples, "n_samples")
        self.chunk_size = check_chunk_size(self.chunk_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.normalize = check_choice(self.normalize, "normalize", NORMALIZE_MODES)
        self.alpha = check_alpha(self.alpha)
        self.method = check_choice(self.method, "method", BOUND_METHODS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FSConfig":
        return dataclass_from_dict(cls, data)

    def replace(self, **changes: Any) -> "FSConfig":
        return dataclasses.replace(self, **changes)

"""The statistics of the certificate, in one module: FCSB, certified radius and sound lower bounds.

Phi and Phi^-1 come from scipy.stats.norm for floats and numpy arrays, and from torch.special for
tensors (same functions), so every formula works on all three.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

from .config import BOUND_METHODS, CertifyConfig, check_alpha, check_choice, check_sigma

ArrayLike = Union[float, np.ndarray, torch.Tensor]

NO_GUARANTEE = -1.0


def _norm():
    """scipy.stats.norm, imported on first use: scipy.stats costs about a second to import, which every
    ``import fs_mllm`` (every ``fs-mllm`` command, ``--help`` included) would otherwise pay."""
    from scipy.stats import norm

    return norm


def _phi(x):
    return torch.special.ndtr(x) if isinstance(x, torch.Tensor) else _norm().cdf(x)


def _phi_inv(p):
    return torch.special.ndtri(p) if isinstance(p, torch.Tensor) else _norm().ppf(p)


def _as_values(value: ArrayLike, name: str):
    if isinstance(value, torch.Tensor):
        return value.double()
    array = np.asarray(value, dtype=np.float64)
    return array


def _check_unit_interval(values, name: str) -> None:
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    if not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v > 1):
        raise ValueError(f"{name} must lie in [0, 1] (a robustness score), got values outside it")


def _finish(result):
    """Return a Python float for scalar inputs, else an array, or a float64 tensor for tensor inputs: rounding a
    bound to the input's dtype (bf16, fp16, even fp32) could round it up, and a bound must never grow."""
    if isinstance(result, torch.Tensor):
        return result
    result = np.asarray(result)
    return float(result) if result.ndim == 0 else result


def fcsb(score: ArrayLike, radius: ArrayLike, sigma: float) -> ArrayLike:
    """Feature Cosine Similarity Bound: 2 Phi(Phi^-1(score) - radius/sigma) - 1, or -1.0 (no guarantee) where negative.

    For every x' with ||x' - x||_2 <= radius, cos(F(x'), F(x)) >= fcsb(S(x), radius, sigma), F the smoothed
    encoder; given a (1 - alpha) lower confidence bound on S(x) as ``score``, this holds with probability
    >= 1 - alpha. Below 0 the argument bounds no cosine, hence -1.0.

    Args:
        score: the robustness score S(x) or its lower bound, in [0, 1]: a float, or an array or tensor of
            any shape.
        radius: l2 distance(s) in [0,1] pixel space, >= 0: a float, array or tensor broadcast with ``score``.
        sigma: Gaussian noise std in [0,1] pixel space, in (0, 10].

    Returns:
        The bound, in [0, 1] or -1.0: a float for scalar inputs, else an array of the broadcast shape (a
        float64 tensor when an input is a tensor).

    Raises:
        ValueError: a score outside [0, 1] or not finite, a negative or non-finite radius, or sigma out of range.
    """
    sigma = check_sigma(sigma)
    s = _as_values(score, "score")
    r = _as_values(radius, "radius")
    _check_unit_interval(s, "score")
    r_np = r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else r
    if not np.all(np.isfinite(r_np)) or np.any(r_np < 0):
        raise ValueError(f"radius must be finite and >= 0 (an l2 distance in [0,1] pixel space), got {radius!r}")
    if isinstance(s, torch.Tensor) or isinstance(r, torch.Tensor):
        s = s if isinstance(s, torch.Tensor) else torch.as_tensor(s)
        r = r if isinstance(r, torch.Tensor) else torch.as_tensor(r, device=s.device)
        bound = 2 * _phi(_phi_inv(s) - r.to(s.device) / sigma) - 1
        bound = torch.where(bound >= 0, bound, torch.full_like(bound, NO_GUARANTEE))
    else:
        with np.errstate(invalid="ignore"):
            bound = 2 * _phi(_phi_inv(s) - r / sigma) - 1
        bound = np.where(bound >= 0, bound, NO_GUARANTEE)
    return _finish(bound)


def certified_radius(score: ArrayLike, sigma: float, threshold: float = 0.0) -> ArrayLike:
    """Largest l2 radius at which the FCSB still guarantees a cosine of at least ``threshold``.

    R = sigma * (Phi^-1(score) - Phi^-1((1 + threshold) / 2)), 0.0 where negative.

    Args:
        score: the robustness score S(x) or its lower bound, in [0, 1]: a float, or an array or tensor of
            any shape.
        sigma: Gaussian noise std in [0,1] pixel space, in (0, 10].
        threshold: the cosine similarity to guarantee, in [0, 1) (0: the features stay within 90 degrees).

    Returns:
        The radius, l2 in [0,1] pixel space, >= 0 (inf where score is 1): a float for a scalar score, else
        the shape of ``score`` (a float64 tensor for a tensor).

    Raises:
        ValueError: a score outside [0, 1] or not finite, a threshold outside [0, 1), or sigma out of range.
    """
    sigma = check_sigma(sigma)
    threshold = float(threshold)
    if not (0.0 <= threshold < 1.0):  # below 0 the FCSB bounds <F(x'), u> only, which says nothing about the cosine
        raise ValueError(f"threshold must lie in [0, 1) (a cosine similarity the FCSB can guarantee; it certifies no "
                         f"negative cosine: use 0 for the radius where the features stay within 90 degrees), got {threshold!r}")
    s = _as_values(score, "score")
    _check_unit_interval(s, "score")
    offset = float(_norm().ppf((1.0 + threshold) / 2.0))
    if isinstance(s, torch.Tensor):
        radius = torch.clamp(sigma * (_phi_inv(s) - offset), min=0.0)
    else:
        radius = np.maximum(sigma * (_phi_inv(s) - offset), 0.0)
    return _finish(radius)


def score_lower_bound(samples: ArrayLike, alpha: float, method: str = CertifyConfig.method) -> ArrayLike:
    """One-sided (1 - alpha) lower confidence bound on the mean of i.i.d. samples in [0, 1].

    ``method`` picks the bound:

    - hoeffding: mean - sqrt(ln(1/alpha) / (2n)).
    - bernstein: empirical Bernstein (Maurer & Pontil 2009, Thm 4),
      mean - sqrt(2 V ln(2/alpha) / n) - 7 ln(2/alpha) / (3 (n - 1)), V the unbiased sample variance.
    - betting: a one-sided betting confidence sequence (Waudby-Smith & Ramdas 2023) with predictable
      plug-in bets that do not depend on the tested mean, so the rejected set is an interval and a
      bisection finds its end; valid by Ville's inequality.
    - betting_fixed: the same test with bets tuned to the sample size n fixed in advance (Waudby-Smith &
      Ramdas 2023, sec. 5: lam_t = sqrt(2 ln(1/alpha) / (n var_{t-1}))) and capped at 0.99 / m for
      the tested mean m (so 1 + lam (x - m) >= 0.01 for every x in [0, 1]): a confidence interval for
      this n rather than a sequence valid at every n, tighter at that n. Each factor of the capital
      still falls with m, so the rejected set is an interval; valid by Ville's inequality at the true m.

    Args:
        samples: scores in [0, 1], shape (..., n) with n >= 2 along the last axis; leading axes are
            independent problems (one bound each). A sequence, array or tensor.
        alpha: failure probability, in (0, 1).
        method: "hoeffding", "bernstein", "betting" or "betting_fixed".

    Returns:
        The bound(s), clipped to [0, 1], of shape (...) (``samples`` less its last axis): a float for 1-D
        samples, else an array, or a float64 tensor for tensor samples.

    Raises:
        ValueError: scalar samples, fewer than 2 along the last axis, values outside [0, 1] or not
            finite, alpha outside (0, 1), or an unknown method.
    """
    alpha = check_alpha(alpha)
    check_choice(method, "method", BOUND_METHODS)
    is_tensor = isinstance(samples, torch.Tensor)
    x = samples.detach().double().cpu().numpy() if is_tensor else np.asarray(samples, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("samples must be a sequence of scores in [0, 1], got a scalar")
    n = x.shape[-1]
    if n < 2:
        raise ValueError(f"samples must hold at least 2 scores along the last axis, got {n}")
    _check_unit_interval(x, "samples")
    mean = x.mean(axis=-1)
    if method == "hoeffding":
        lower = mean - math.sqrt(-math.log(alpha) / (2.0 * n))  # -log(alpha), not log(1/alpha): 1/alpha overflows
    elif method == "bernstein":
        var = x.var(axis=-1, ddof=1)
        log_term = math.log(2.0) - math.log(alpha)
        lower = mean - np.sqrt(2.0 * var * log_term / n) - 7.0 * log_term / (3.0 * (n - 1))
    elif method == "betting":
        lower = _betting_lower_bound(x, alpha)
    else:
        lower = _betting_lower_bound(x, alpha, fixed_n=True)
    lower = np.clip(lower, 0.0, 1.0)
    if is_tensor:  # float64 whatever the samples' dtype: rounding to bf16 / fp32 could raise the bound
        return torch.as_tensor(lower, dtype=torch.float64)
    return float(lower) if np.ndim(lower) == 0 else lower


_BET_CAP = 0.9  # bets in [0, 0.9] keep 1 + lam * (x - m) >= 0.1 > 0 for every x, m in [0, 1]


def _variance_estimates(x: np.ndarray) -> np.ndarray:
    """Predictable variance estimates: entry t uses only the samples before step t (WSR 2023, eq. 26)."""
    n = x.shape[-1]
    t = np.arange(1, n + 1, dtype=np.float64)
    cumsum = np.cumsum(x, axis=-1)
    mu_hat = (0.5 + cumsum) / (t + 1)
    sq_dev = np.cumsum((x - mu_hat) ** 2, axis=-1)
    var_hat = (0.25 + sq_dev) / (t + 1)
    return np.concatenate([np.full(x.shape[:-1] + (1,), 0.25), var_hat[..., :-1]], axis=-1)


def _betting_bets(x: np.ndarray, alpha: float) -> np.ndarray:
    """Predictable plug-in bets (WSR 2023, eq. 26), using only samples before each step."""
    n = x.shape[-1]
    t = np.arange(1, n + 1, dtype=np.float64)
    lam = np.sqrt(2.0 * -math.log(alpha) / (_variance_estimates(x) * t * np.log1p(t)))
    return np.minimum(lam, _BET_CAP)


_FIXED_N_CAP = 0.99  # bets up to 0.99 / m keep 1 + lam * (x - m) >= 0.01 > 0 for every x in [0, 1]


def _betting_lower_bound(x: np.ndarray, alpha: float, iterations: int = 50, fixed_n: bool = False) -> np.ndarray:
    """Smallest m whose capital process never reaches 1/alpha; bisection returns a point below it."""
    if fixed_n:
        tuned = np.sqrt(2.0 * -math.log(alpha) / (x.shape[-1] * _variance_estimates(x)))

        def bets(m: np.ndarray) -> np.ndarray:
            return np.minimum(tuned, _FIXED_N_CAP / np.maximum(m, 1e-12)[..., None])
    else:
        fixed = _betting_bets(x, alpha)

        def bets(m: np.ndarray) -> np.ndarray:
            return fixed
    log_threshold = -math.log(alpha)

    def rejected(m: np.ndarray) -> np.ndarray:
        log_capital = np.cumsum(np.log1p(bets(m) * (x - m[..., None])), axis=-1)
        return log_capital.max(axis=-1) >= log_threshold

    lo = np.zeros(x.shape[:-1])  # the bound we return; m = 0 is never "rejected away" since 0 <= mean
    hi = x.mean(axis=-1)  # the capital for m = mean cannot grow reliably; only m below it can be rejected
    hi_rejected = rejected(hi)
    lo = np.where(hi_rejected, hi, lo)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        mid_rejected = rejected(mid)
        lo = np.where(mid_rejected, mid, lo)
        hi = np.where(mid_rejected, hi, mid)
    # every m <= lo is rejected (capital is decreasing in m), so the true mean exceeds lo w.p. >= 1 - alpha
    return lo


def clopper_pearson_lower(successes: Union[int, np.ndarray], trials: Union[int, np.ndarray], alpha: float) -> Union[float, np.ndarray]:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial success probability.

    For k successes in n independent Bernoulli(p) draws, P(p >= bound) >= 1 - alpha with bound the
    alpha-quantile of Beta(k, n - k + 1) (scipy.stats.beta.ppf), 0.0 for k = 0: exact (never
    anti-conservative) for every p; Cohen et al. 2019's ``LowerConfBound``.

    Args:
        successes: k, an integer or integer array (any shape, broadcast with ``trials``), 0 <= k <= n.
        trials: n, an integer or integer array (any shape, broadcast with ``successes``), >= 1.
        alpha: failure probability, in (0, 1).

    Returns:
        The bound in [0, 1]: a float for scalar counts, else a float64 array of the broadcast shape.

    Raises:
        ValueError: counts that are not integers (bools included), k < 0, k > n, n < 1, or alpha outside (0, 1).
    """
    from scipy.stats import beta

    alpha = check_alpha(alpha)
    k = np.asarray(successes)
    n = np.asarray(trials)
    for name, value in (("successes", k), ("trials", n)):
        if value.dtype == bool or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{name} must be an integer count (or integer array), got {value.dtype} {value!r}")
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got successes={successes!r}, trials={trials!r}")
    k, n = np.broadcast_arrays(k.astype(np.float64), n.astype(np.float64))
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1.0), n - k + 1.0), 0.0)
    return float(lower) if lower.ndim == 0 else lower

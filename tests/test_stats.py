"""The certificate's formulas against scipy, and the soundness of the lower confidence bounds."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from fs_mllm import certified_radius, fcsb, score_lower_bound

SCORES = [0.5, 0.5001, 0.6, 0.75, 0.8, 0.9, 0.99, 0.999999, 1.0]
RADII = [0.0, 0.01, 0.1, 0.125, 0.25, 0.5, 1.0]


def reference_fcsb(score, radius, sigma):
    value = 2 * norm.cdf(norm.ppf(score) - radius / sigma) - 1
    return value if value >= 0 else -1.0


@pytest.mark.parametrize("sigma", [0.1, 0.25, 0.5])
def test_fcsb_matches_scipy_on_floats_arrays_and_tensors(sigma):
    for s in SCORES:
        for r in RADII:
            expected = reference_fcsb(s, r, sigma)
            assert fcsb(s, r, sigma) == pytest.approx(expected, abs=1e-12)
    grid_s, grid_r = np.meshgrid(SCORES, RADII)
    expected = np.vectorize(reference_fcsb)(grid_s, grid_r, sigma)
    np.testing.assert_allclose(fcsb(grid_s, grid_r, sigma), expected, atol=1e-12)
    tensor = fcsb(torch.tensor(grid_s), torch.tensor(grid_r), sigma)
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-9)


def test_fcsb_edges():
    assert fcsb(0.5, 0.0, 0.25) == 0.0  # 2 * 0.5 - 1
    assert fcsb(0.8, 0.0, 0.25) == pytest.approx(0.6)  # radius 0 gives 2S - 1 = <F(x), f(x)>
    assert fcsb(1.0, 0.3, 0.25) == 1.0  # a constant encoder is certified everywhere
    assert fcsb(0.5, 0.01, 0.25) == -1.0  # below zero means no guarantee, reported as -1
    assert fcsb(0.3, 0.0, 0.25) == -1.0
    values = [fcsb(0.9, r, 0.25) for r in np.linspace(0, 0.4, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone in the radius


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
def test_certified_radius_matches_scipy_and_inverts_fcsb(threshold):
    sigma = 0.25
    for s in SCORES[:-1]:
        expected = max(sigma * (norm.ppf(s) - norm.ppf((1 + threshold) / 2)), 0.0)
        radius = certified_radius(s, sigma, threshold)
        assert radius == pytest.approx(expected, abs=1e-12)
        if radius > 0:
            assert fcsb(s, radius, sigma) == pytest.approx(threshold, abs=1e-9)
    assert certified_radius(0.5, sigma) == 0.0
    t = certified_radius(torch.tensor([0.5, 0.9]), sigma, threshold)
    assert isinstance(t, torch.Tensor) and t.shape == (2,)


@pytest.mark.parametrize(
    "call, parameter",
    [
        (lambda: fcsb(1.2, 0.1, 0.25), "score"),
        (lambda: fcsb(float("nan"), 0.1, 0.25), "score"),
        (lambda: fcsb(0.8, -0.1, 0.25), "radius"),
        (lambda: fcsb(0.8, 0.1, 0.0), "sigma"),
        (lambda: fcsb(0.8, 0.1, float("inf")), "sigma"),
        (lambda: certified_radius(0.8, -1.0), "sigma"),
        (lambda: certified_radius(0.8, 0.25, 1.0), "threshold"),
        (lambda: certified_radius(0.8, 0.25, -0.5), "threshold"),
        (lambda: score_lower_bound([0.5, 1.5], 0.01), "samples"),
        (lambda: score_lower_bound([0.5], 0.01), "samples"),
        (lambda: score_lower_bound([0.5, 0.6], 0.0), "alpha"),
        (lambda: score_lower_bound([0.5, 0.6], 1.0), "alpha"),
        (lambda: score_lower_bound([0.5, 0.6], 0.01, "chernoff"), "method"),
    ],
)
def test_bad_input_names_the_parameter(call, parameter):
    with pytest.raises(ValueError, match=parameter):
        call()


def test_a_radius_for_a_negative_cosine_would_be_violated_so_it_is_refused():
    """Where <F(x'), u> < 0 the cosine can be lower still (||F(x')|| < 1), so the radius formula at a negative
    threshold certifies nothing. A 2-D encoder whose F is known by quadrature breaks it: f(z) = u left of
    z1 = 0, and on the right stripes (width 0.01 along z2) of -u (30%), +v and -v (35% each)."""
    sigma, share, width = 0.25, 0.3, 0.01
    u, v = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    e2 = np.linspace(-8 * sigma, 8 * sigma, 200001)
    weights = norm.pdf(e2 / sigma) / norm.pdf(e2 / sigma).sum()
    phase = np.mod((0.5 + e2) / width, 1.0)
    right = np.where((phase < share)[:, None], -u, np.where((phase < share + (1 - share) / 2)[:, None], v, -v))
    right_mean = (right * weights[:, None]).sum(0)

    def smoothed(x1: float) -> np.ndarray:  # F at (x1, 0.5)
        left = norm.cdf(-x1 / sigma)
        return left * u + (1 - left) * right_mean

    x1 = -0.3
    left = norm.cdf(-x1 / sigma)
    score = left + (1 - left) * (1 - share) * 0.5  # S(x) exactly: f(x) = u, cos is 1, -1 or 0 on the right
    radius = max(sigma * (norm.ppf(score) - norm.ppf((1 - 0.5) / 2)), 0.0)  # the formula at threshold -0.5
    assert radius > 0.5
    moved = smoothed(x1 + 0.999 * radius)
    cosine = moved @ smoothed(x1) / np.linalg.norm(moved) / np.linalg.norm(smoothed(x1))
    assert cosine < -0.5  # the would-be certificate is broken ...
    with pytest.raises(ValueError, match="threshold"):
        certified_radius(score, sigma, -0.5)  # ... so it is refused
    assert fcsb(score, radius, sigma) == -1.0  # and the FCSB itself gives no guarantee there


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bounds_of_low_precision_tensors_are_not_rounded_up(dtype):
    """A bound rounded to the input's dtype can land above the exact one; the results stay float64."""
    rng = np.random.default_rng(5)
    samples = torch.tensor(rng.beta(30, 2, size=(64, 200)), dtype=dtype)
    exact = score_lower_bound(samples.double().numpy(), 0.001)
    lower = score_lower_bound(samples, 0.001)
    assert lower.dtype == torch.float64 and np.array_equal(lower.numpy(), exact)
    scores = torch.tensor(rng.uniform(0.6, 1.0, size=64), dtype=dtype)
    for result, reference in ((fcsb(scores, 0.1, 0.25), fcsb(scores.double().numpy(), 0.1, 0.25)),
                              (certified_radius(scores, 0.25, 0.5), certified_radius(scores.double().numpy(), 0.25, 0.5))):
        assert result.dtype == torch.float64 and np.allclose(result.numpy(), reference, rtol=0, atol=1e-12)


def test_bounds_stay_numbers_at_the_smallest_alpha():
    """1/alpha overflows for alpha below ~1e-308; the bounds use -log(alpha) and stay finite (vacuous)."""
    for method in ("hoeffding", "bernstein", "betting", "betting_fixed"):
        lower = score_lower_bound(np.ones(100), 1e-320, method)
        assert np.isfinite(lower) and 0.0 <= lower <= 1.0, method


def test_bounds_follow_their_formulas():
    rng = np.random.default_rng(0)
    x = rng.beta(8, 2, size=500)
    alpha, n = 0.01, 500
    hoeffding = x.mean() - math.sqrt(math.log(1 / alpha) / (2 * n))
    log_term = math.log(2 / alpha)
    bernstein = x.mean() - math.sqrt(2 * x.var(ddof=1) * log_term / n) - 7 * log_term / (3 * (n - 1))
    assert score_lower_bound(x, alpha, "hoeffding") == pytest.approx(hoeffding)
    assert score_lower_bound(x, alpha, "bernstein") == pytest.approx(bernstein)
    betting = score_lower_bound(x, alpha, "betting")
    assert 0.0 <= betting < x.mean()
    t = score_lower_bound(torch.tensor(x), alpha, "bernstein")
    assert isinstance(t, torch.Tensor) and float(t) == pytest.approx(bernstein)


def test_bounds_are_batched_along_leading_axes():
    rng = np.random.default_rng(1)
    x = rng.beta(8, 2, size=(3, 4, 200))
    for method in ("hoeffding", "bernstein", "betting", "betting_fixed"):
        batched = score_lower_bound(x, 0.05, method)
        assert batched.shape == (3, 4)
        assert batched[2, 1] == pytest.approx(score_lower_bound(x[2, 1], 0.05, method))


# Distributions on [0, 1] with known means; the last ones concentrate near 1 like real robustness scores.
DISTRIBUTIONS = {
    "beta(8,2)": (lambda rng, size: rng.beta(8, 2, size), 0.8),
    "arcsine": (lambda rng, size: rng.beta(0.5, 0.5, size), 0.5),
    "bernoulli(0.9)": (lambda rng, size: (rng.random(size) < 0.9).astype(float), 0.9),
    "atom at 1 + uniform": (lambda rng, size: np.where(rng.random(size) < 0.95, 1.0, rng.random(size)), 0.975),
    "beta(200,10)": (lambda rng, size: rng.beta(200, 10, size), 200 / 210),
}


def failure_count(bound, sampler, mean, reps, n, alpha, seed):
    rng = np.random.default_rng(seed)
    lower = bound(sampler(rng, (reps, n)), alpha)
    return int(np.sum(lower > mean))


def allowed_failures(reps, alpha):
    # the 1 - 1e-4 quantile of Binomial(reps, alpha): a sound bound passes this check with prob > 0.9999
    return int(binom.ppf(1 - 1e-4, reps, alpha))


@pytest.mark.parametrize("method", ["hoeffding", "bernstein", "betting", "betting_fixed"])
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_lower_bound_fails_at_most_alpha_of_the_time(method, name):
    sampler, mean = DISTRIBUTIONS[name]
    reps, n, alpha = 2000, 100, 0.05
    failures = failure_count(lambda x, a: score_lower_bound(x, a, method), sampler, mean, reps, n, alpha, seed=7)
    assert failures <= allowed_failures(reps, alpha), f"{method} on {name}: {failures} failures of {reps}"


def test_the_soundness_check_catches_an_unsound_bound():
    """The check above can fail: the plain sample mean, used as a 'bound', is caught."""
    sampler, mean = DISTRIBUTIONS["beta(8,2)"]
    reps, n, alpha = 2000, 100, 0.05
    naive = lambda x, a: x.mean(axis=-1)  # noqa: E731
    assert failure_count(naive, sampler, mean, reps, n, alpha, seed=7) > allowed_failures(reps, alpha)


def test_bernstein_and_betting_are_tighter_than_hoeffding_on_concentrated_scores():
    rng = np.random.default_rng(3)
    x = rng.beta(200, 10, size=1000)
    h, b, w = (score_lower_bound(x, 0.001, m) for m in ("hoeffding", "bernstein", "betting"))
    assert h < b and h < w


def test_fixed_n_betting_is_tighter_than_the_sequence_at_that_n_on_concentrated_scores():
    """Bets tuned to the fixed n (and allowed up to 0.99 / m) buy a tighter bound at that n."""
    rng = np.random.default_rng(4)
    x = rng.beta(300, 30, size=(8, 1000))
    sequence, fixed = (score_lower_bound(x, 0.001, m) for m in ("betting", "betting_fixed"))
    assert np.all(fixed > sequence) and np.all(fixed < x.mean(axis=-1))


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_fixed_n_betting_fails_at_most_alpha_of_the_time_at_a_larger_n_and_small_alpha(name):
    """The soundness check again for the newest bound, at n = 400 and alpha = 0.01 (its caps bind harder)."""
    sampler, mean = DISTRIBUTIONS[name]
    reps, n, alpha = 3000, 400, 0.01
    failures = failure_count(lambda x, a: score_lower_bound(x, a, "betting_fixed"), sampler, mean, reps, n, alpha, seed=11)
    assert failures <= allowed_failures(reps, alpha), f"betting_fixed on {name}: {failures} failures of {reps}"

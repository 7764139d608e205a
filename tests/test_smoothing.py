"""The Monte-Carlo engine: determinism, chunking invariance, bounded memory, dtypes and bad input."""

import pytest
import torch

from fs_mllm import FSConfig, certify_features, smooth_features
from fs_mllm.smoothing import image_noise_seed, monte_carlo_pass, smoothed_mean, unit_features


class RecordingEncoder(torch.nn.Module):
    """A small nonlinear encoder (B, 3, 4, 4) -> (B, 6, 5) that records the batch sizes it sees."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 30))
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.net(x.float()).reshape(x.shape[0], 6, 5).to(x.dtype)


@pytest.fixture
def images():
    return torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def test_same_seed_same_result_other_seed_other_result(images):
    encoder = RecordingEncoder()
    a = smooth_features(encoder, images, FSConfig(sigma=0.25, n_samples=16, seed=1))
    b = smooth_features(encoder, images, FSConfig(sigma=0.25, n_samples=16, seed=1))
    c = smooth_features(encoder, images, FSConfig(sigma=0.25, n_samples=16, seed=2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (3, 6, 5)


def test_chunk_size_does_not_change_the_result(images):
    encoder = RecordingEncoder()
    one = smooth_features(encoder, images, FSConfig(sigma=0.25, n_samples=64, chunk_size=1))
    many = smooth_features(encoder, images, FSConfig(sigma=0.25, n_samples=64, chunk_size=64))
    odd = smooth_features(encoder, images, FSConfig(sigma=0.25, n_samples=64, chunk_size=7))
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, odd, atol=1e-5, rtol=1e-5)
    c1 = certify_features(encoder, images, 0.25, n=64, chunk_size=1)
    c64 = certify_features(encoder, images, 0.25, n=64, chunk_size=64)
    for a, b in zip(c1, c64):
        assert a.score_lower == pytest.approx(b.score_lower, abs=1e-6)


def test_an_images_smoothing_does_not_depend_on_its_batch(images):
    """Same image, same seed: the same smoothed features and certificate alone, at another position, next
    to other images, next to a copy of itself, and with any chunk size."""
    encoder = RecordingEncoder()
    config = FSConfig(sigma=0.25, n_samples=24, seed=3)
    alone = smooth_features(encoder, images[1:2], config)[0]
    other = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    for batch, position in ((images, 1), (images.flip(0), 1), (torch.cat([other, images[1:2]]), 4),
                            (torch.cat([images[1:2], images[1:2], other]), 1)):
        for chunk_size in (1, 5, 24):
            smoothed = smooth_features(encoder, batch, config.replace(chunk_size=chunk_size))[position]
            torch.testing.assert_close(smoothed, alone, atol=1e-6, rtol=1e-5)
    lone = certify_features(encoder, images[1:2], 0.25, n=24, seed=3)[0]
    mixed = certify_features(encoder, torch.cat([other, images[1:2]]), 0.25, n=24, seed=3, chunk_size=5)[4]
    assert mixed.score_lower == pytest.approx(lone.score_lower, abs=1e-6)


def test_one_copy_is_that_noisy_copys_features(images):
    """n0 = 1 (allowed inside generate, not for certificates): the smoothed features are exactly the
    features of the image's first noisy copy, the copy that n0 = 8 starts its average with."""
    identity = lambda x: x.flatten(1)  # noqa: E731
    one = smooth_features(identity, images, FSConfig(sigma=0.25, n_samples=1, seed=5))
    first = smoothed_mean(identity, images, 0.25, 8, seed=5, chunk_size=1)  # noise stream is chunk-invariant
    copy = images.flatten(1) + 0.25 * torch.stack([
        torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(image_noise_seed(5, image))).flatten()
        for image in images])
    torch.testing.assert_close(one, copy, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one, first.mean_unit * first.mean_norm.unsqueeze(-1), atol=1e-3)  # 8 copies differ
    with pytest.raises(ValueError, match="n"):
        certify_features(identity, images, 0.25, n=1)


def test_two_images_never_share_noise():
    """Noise is drawn per image from a stream seeded by the seed and the pixels, so different images (even
    differing in one pixel, or identical pixels in another shape) get different noise."""
    identity = lambda x: x.flatten(1)  # noqa: E731  (the unit features are then the noisy images' directions)
    image = torch.full((1, 3, 4, 4), 0.5)
    nudged = image.clone()
    nudged[0, 0, 0, 0] = 0.5 + 1e-3
    seeds = {image_noise_seed(0, image[0]), image_noise_seed(0, nudged[0]), image_noise_seed(1, image[0]),
             image_noise_seed(0, image[0].reshape(3, 2, 8))}
    assert len(seeds) == 4
    a, b = (smoothed_mean(identity, x, 1.0, 2, seed=0).mean_unit for x in (image, nudged))
    assert torch.nn.functional.cosine_similarity(a, b).item() < 0.9


def test_encoder_batches_never_exceed_chunk_size_whatever_n(images):
    """Peak memory is set by chunk_size, not by n: the engine never encodes more than chunk_size copies at once."""
    for n in (10, 1000):
        encoder = RecordingEncoder()
        certify_features(encoder, images, 0.25, n=n, chunk_size=8)
        noisy_batches = encoder.batch_sizes[1:]  # the first call encodes the clean images
        assert max(noisy_batches) == 8 * images.shape[0]
        assert sum(noisy_batches) == n * images.shape[0]


def test_running_mean_equals_the_mean_of_unit_features(images):
    encoder = RecordingEncoder()
    result = smoothed_mean(encoder, images, 0.3, 12, seed=5, chunk_size=5)
    generators = [torch.Generator().manual_seed(image_noise_seed(5, image)) for image in images]
    noise = torch.stack([torch.stack([torch.randn(images.shape[1:], generator=g) for g in generators]) for _ in range(12)])
    feats = encoder((images.unsqueeze(0) + 0.3 * noise).reshape(-1, 3, 4, 4)).reshape(12, 3, -1)
    unit = feats / feats.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(result.mean_unit.flatten(1), unit.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.mean_norm, feats.norm(dim=-1).mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", ["global", "token"])
def test_scores_are_the_cosines_to_the_reference_with_or_without_the_mean(images, normalize):
    """Certification's scores-only pass (mean=False) gives the scores of the full pass bit for bit, and
    both are (1 + cos(f(x + e_i), reference)) / 2 computed independently from the same noisy copies."""
    encoder = RecordingEncoder()
    reference, _ = unit_features(encoder(images), normalize)
    full = monte_carlo_pass(encoder, images, 0.3, 12, seed=5, chunk_size=5, normalize=normalize, reference_unit=reference)
    only = monte_carlo_pass(encoder, images, 0.3, 12, seed=5, chunk_size=5, normalize=normalize, reference_unit=reference,
                            mean=False)
    assert only.mean_unit is None and only.mean_norm is None and full.mean_unit is not None
    assert torch.equal(only.scores, full.scores)
    generators = [torch.Generator().manual_seed(image_noise_seed(5, image)) for image in images]
    noise = torch.stack([torch.stack([torch.randn(images.shape[1:], generator=g) for g in generators]) for _ in range(12)])
    feats = encoder((images.unsqueeze(0) + 0.3 * noise).reshape(-1, 3, 4, 4)).reshape(12, 3, 6, 5)
    if normalize == "global":
        cos = torch.nn.functional.cosine_similarity(feats.flatten(2), reference.flatten(1).unsqueeze(0), dim=-1)
    else:
        cos = torch.nn.functional.cosine_similarity(feats, reference.unsqueeze(0), dim=-1)
    assert only.scores.shape == cos.shape
    torch.testing.assert_close(only.scores, ((1 + cos.double()) / 2).clamp(0, 1), atol=1e-6, rtol=0)


class BreaksOnCall(RecordingEncoder):
    """Returns NaN, Inf or all-zero features for one image on one call, the others as RecordingEncoder."""

    def __init__(self, call: int, value: float):
        super().__init__()
        self.call, self.value, self.calls = call, value, 0

    def forward(self, x):
        features = super().forward(x)
        self.calls += 1
        if self.calls == self.call:
            features = features.clone()
            features[1] = 0.0 if self.value == 0 else features[1] * self.value
        return features


@pytest.mark.parametrize("normalize", ["global", "token"])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("value, message", [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"),
                                            (0.0, "all-zero feature vector")])
@pytest.mark.parametrize("bad_chunk", [1, 2, 3])
@pytest.mark.parametrize("per_chunk", [True, False])
def test_invalid_features_in_any_chunk_are_an_error_not_a_result(images, normalize, mean, value, message, bad_chunk,
                                                                  per_chunk, monkeypatch):
    """NaN, Inf or all-zero features in the first, a middle or the last (partial) chunk raise, whichever pass
    and normalisation. On a CPU each chunk is checked as it comes; on an accelerator (simulated here) the
    flags are OR-ed on the device and read after the last chunk, before anything is returned."""
    monkeypatch.setattr("fs_mllm.smoothing.checks_each_chunk", lambda device: per_chunk)
    reference, _ = unit_features(RecordingEncoder()(images), normalize)
    encoder = BreaksOnCall(call=bad_chunk, value=value)  # n 10 in chunks of 4: 4, 4, 2 copies
    with pytest.raises(ValueError, match=message):
        monte_carlo_pass(encoder, images, 0.3, 10, seed=5, chunk_size=4, normalize=normalize,
                         reference_unit=reference, mean=mean)
    assert encoder.calls == (bad_chunk if per_chunk else 3)
    if normalize == "global":  # token mode: a zero image zeroes every token, the same error
        with pytest.raises(ValueError, match=message):
            certify_features(BreaksOnCall(call=bad_chunk + 1, value=value), images, 0.25, n=10, chunk_size=4)


def test_on_an_accelerator_the_pass_reads_nothing_back_before_its_last_chunk(images):
    """A read of a device tensor on the host (a validity check) makes the host wait for a GPU to finish the
    chunk. Features on the meta device hold no data, so any such read raises: the smoothing pass must encode
    every chunk first and read its checks once, at the end, and so never return an unchecked result."""
    chunks = []

    def encode_on_meta(copies):
        chunks.append(copies.shape[0])
        return torch.empty((copies.shape[0], 6, 5), device="meta")

    with pytest.raises(NotImplementedError, match="meta"):
        monte_carlo_pass(encode_on_meta, images, 0.3, 12, chunk_size=4)
    assert chunks == [4 * images.shape[0]] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("normalize", ["global", "token"])
def test_on_cuda_the_host_waits_as_often_for_any_number_of_chunks(normalize):
    """On a GPU neither the checks nor the scores make the host wait per chunk, and the scores still reach
    the host, in float64, whole."""
    import warnings

    encoder = RecordingEncoder().cuda()
    images = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)).cuda()
    reference, _ = unit_features(encoder(images), normalize)

    def waits(n):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = monte_carlo_pass(encoder, images, 0.3, n, chunk_size=4, normalize=normalize,
                                          reference_unit=reference, mean=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), result.scores

    waits(8)  # one-time set-up in a process's first pass is not a per-pass wait (an H200 showed 6 vs 5, first case only)
    few, scores_few = waits(8)
    many, scores_many = waits(64)
    assert few == many, f"{few} waits for 2 chunks, {many} for 16"
    assert scores_many.device.type == "cpu" and scores_many.dtype == torch.float64 and scores_many.shape[0] == 64
    assert torch.equal(scores_many[:8], scores_few)  # the same streams, the same chunks of 4
    whole = monte_carlo_pass(encoder, images, 0.3, 64, chunk_size=64, normalize=normalize, reference_unit=reference,
                             mean=False).scores
    torch.testing.assert_close(scores_many, whole, atol=1e-6, rtol=0)


def test_scores_only_pass_needs_a_reference(images):
    with pytest.raises(ValueError, match="reference_unit"):
        monte_carlo_pass(RecordingEncoder(), images, 0.3, 4, mean=False)


def test_tiny_sigma_keeps_the_direction_large_sigma_changes_it(images):
    encoder = RecordingEncoder()
    base = encoder(images).flatten(1)
    tiny = smooth_features(encoder, images, FSConfig(sigma=1e-4, n_samples=32)).flatten(1)
    large = smooth_features(encoder, images, FSConfig(sigma=2.0, n_samples=32)).flatten(1)
    assert torch.nn.functional.cosine_similarity(tiny, base).min() > 0.9999
    assert torch.nn.functional.cosine_similarity(large, base).min() < 0.99
    # rescaled to the encoder's feature scale
    torch.testing.assert_close(tiny.norm(dim=-1), base.norm(dim=-1), rtol=1e-3, atol=1e-4)


def test_token_mode_normalises_each_token(images):
    encoder = RecordingEncoder()
    out = smooth_features(encoder, images, FSConfig(sigma=1e-4, n_samples=8, normalize="token"))
    torch.testing.assert_close(out.norm(dim=-1), encoder(images).norm(dim=-1), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_encoders(images, dtype):
    encoder = RecordingEncoder()
    out = smooth_features(encoder, images.to(dtype), FSConfig(sigma=1e-3, n_samples=8))
    assert out.dtype == dtype
    ref = smooth_features(encoder, images, FSConfig(sigma=1e-3, n_samples=8))
    assert torch.nn.functional.cosine_similarity(out.float().flatten(1), ref.flatten(1)).min() > 0.99


def test_bad_input_gets_a_clear_error(images):
    encoder = RecordingEncoder()
    with pytest.raises(ValueError, match="images"):
        smooth_features(encoder, images * 2)
    with pytest.raises(ValueError, match="NaN"):
        smooth_features(encoder, images.masked_fill(images > 0.5, float("nan")))
    with pytest.raises(ValueError, match="zero"):
        smooth_features(lambda x: torch.zeros(x.shape[0], 4), images)
    with pytest.raises(ValueError, match="NaN"):
        smooth_features(lambda x: torch.full((x.shape[0], 4), float("nan")), images)
    for kwargs, parameter in [
        ({"sigma": 0}, "sigma"), ({"sigma": -1}, "sigma"), ({"sigma": float("nan")}, "sigma"),
        ({"n_samples": 0}, "n_samples"), ({"alpha": 1.5}, "alpha"), ({"alpha": 0}, "alpha"),
        ({"normalize": "patch"}, "normalize"), ({"method": "t-test"}, "method"), ({"chunk_size": 0}, "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=parameter):
            FSConfig(**kwargs)
    with pytest.raises(ValueError, match="n"):
        certify_features(encoder, images, 0.25, n=1)
    with pytest.raises(ValueError, match="alpha"):
        certify_features(encoder, images, 0.25, alpha=1.0)


def test_config_json_round_trip():
    import json

    config = FSConfig(sigma=0.5, n_samples=4, chunk_size=2, seed=3, normalize="token", alpha=0.01, method="betting")
    assert FSConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown FSConfig fields"):
        FSConfig.from_dict({"sigma": 0.1, "noise": 2})


@pytest.mark.parametrize("chunk_size", [1, 5, 32])
def test_noisy_copies_are_exactly_image_plus_std_times_its_streams_draws(images, chunk_size):
    """Bit for bit: copy i of image b is x[b] + std * (draw i of b's own generator), however the engine
    buffers, scales and shifts them (issue 17 made that in place; the values must not move)."""
    seen = []

    def encoder(x):
        seen.append(x.clone())
        return x.flatten(1)

    std = torch.tensor([0.3, 0.5, 0.7]).view(3, 1, 1)
    smoothed_mean(encoder, images, std, 12, seed=7, chunk_size=chunk_size)
    generators = [torch.Generator().manual_seed(image_noise_seed(7, image)) for image in images]
    expected = torch.stack([images + torch.stack([torch.randn(images.shape[1:], generator=g) for g in generators]) * std
                            for _ in range(12)])
    assert torch.equal(torch.cat(seen).reshape(expected.shape), expected)


def test_gradients_flow_to_the_images_through_the_noisy_copies(images):
    """Attacks differentiate through the copies: the in-place noise path must not cut the graph."""
    x = images.clone().requires_grad_(True)
    result = smoothed_mean(RecordingEncoder(), x, 0.25, 6, seed=1, chunk_size=4)
    result.mean_unit.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

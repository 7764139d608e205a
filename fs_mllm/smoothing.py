"""The Monte-Carlo engine of feature-space smoothing, shared by patching, certification and attacks.

An encoder maps a batch (B, ...) to features (B, ...). Every image has its own float32 noise stream,
seeded from the config seed and the image itself (:func:`image_noise_seed`), and its copies are drawn
one at a time from that stream: so an image's smoothed features and certificate do not depend on its
position in the batch, its neighbours, how a call groups images, or ``chunk_size``, and two different
images never share noise. The engine encodes ``chunk_size`` copies of the batch per call and hands the
features on chunk by chunk; :func:`monte_carlo_pass` normalises them (per image, or per visual token)
and keeps running sums and/or the scores, so the memory for features does not grow with n (the scores,
one float per copy and image, or per copy and token, are kept on the host).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch

from .config import DEFAULT_CHUNK_SIZE, DEFAULT_NORMALIZE, FSConfig, NORMALIZE_MODES, check_choice, check_chunk_size, check_n, check_seed

Encoder = Callable[[torch.Tensor], torch.Tensor]
NoiseStd = Union[float, torch.Tensor]



class SmoothedMean(NamedTuple):
    mean_unit: torch.Tensor  # Monte-Carlo estimate of F(x), float32, norm <= 1
    mean_norm: torch.Tensor  # mean feature norm (per image, or per token)
    dtype: torch.dtype  # the encoder's output dtype


def check_images(images: torch.Tensor, name: str = "images", unit_range: bool = True) -> None:
    """The one image check: a non-empty floating-point batch (batch first) of finite [0,1] pixels.

    Integer/bool images are refused because the noise added to them would be truncated, so the
    certificate would be about another (non-Gaussian) distribution. ``unit_range=False`` skips the
    [0,1] check, for processor outputs that are already mean/std normalised.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of [0,1] pixels with a batch dimension, got {type(images).__name__}")
    if images.ndim < 2:
        raise ValueError(f"{name} must have a batch dimension first, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor of [0, 1] pixels, got dtype {images.dtype}; "
            "convert first, e.g. images.float() / 255 for uint8 or images.float() for bool"
        )
    if images.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)}); pass at least one image")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or Inf; pass finite [0,1] pixels")
    if unit_range and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"{name} must lie in [0, 1] (pixels before mean/std normalisation), got range "
            f"[{images.min().item():.3g}, {images.max().item():.3g}]; divide uint8 images by 255"
        )


def unit_features(features: torch.Tensor, normalize: str = DEFAULT_NORMALIZE, batch_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 unit features and their norms: one unit vector per image (global) or per token (token).

    The first ``batch_dims`` axes index images; in token mode the last axis is the feature axis.
    Zero or non-finite features make the direction undefined, so they are an error, not a silent NaN.
    """
    features, norms = float_features_and_norms(features, normalize, batch_dims)
    return features / broadcast_norms(norms, features.ndim), norms


def float_features_and_norms(features: torch.Tensor, normalize: str = DEFAULT_NORMALIZE, batch_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features and their checked norms (per image, or per token): :func:`unit_features` without the division."""
    features, norms = _float_features_and_unchecked_norms(features, normalize, batch_dims)
    raise_for_invalid_norms(invalid_norms(norms))
    return features, norms


def _float_features_and_unchecked_norms(features: torch.Tensor, normalize: str, batch_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_choice(normalize, "normalize", NORMALIZE_MODES)
    features = features.float()
    if normalize == "global":
        return features, features.flatten(batch_dims).norm(dim=-1)
    if features.ndim < batch_dims + 1:
        raise ValueError("normalize='token' needs features of shape (batch, ..., dim)")
    return features, features.norm(dim=-1)


def invalid_norms(norms: torch.Tensor) -> torch.Tensor:
    """(any norm NaN or Inf, any norm zero) as a 2-element bool tensor on the norms' device.

    A NaN or Inf feature makes its vector's norm NaN or Inf: checking the norms (one value per vector)
    instead of every feature saves a pass over the features; a norm that overflows is refused as well.
    Kept on the device so a loop can OR the flags of its chunks and wait for the device once, at the end.
    """
    return torch.stack(((~torch.isfinite(norms)).any(), (norms == 0).any()))


def raise_for_invalid_norms(flags: torch.Tensor) -> None:
    """Raise for flags from :func:`invalid_norms` (this reads them on the host, so it waits for the device)."""
    not_finite, zero = flags.tolist()
    if not_finite:
        raise ValueError("encoder returned NaN or Inf features (or features too large to normalise); "
                         "check the encoder and the input images")
    if zero:
        raise ValueError("encoder returned an all-zero feature vector; its direction (and so the smoothing) is undefined")


def broadcast_norms(norms: torch.Tensor, ndim: int) -> torch.Tensor:
    """Norms (per image or per token) shaped to divide features of ``ndim`` dimensions."""
    return norms.reshape(norms.shape + (1,) * (ndim - norms.ndim))


def image_noise_seed(seed: int, image: torch.Tensor) -> int:
    """The seed of one image's noise stream: a hash of ``seed``, the image's shape and its float32 pixels.

    Deriving the stream from the image (not from its batch position) is what makes smoothing
    batch-invariant; hashing the pixels keeps two different images from sharing noise. The same image
    (bit for bit) under the same seed always gets the same noise. Costs one copy of the image to the CPU.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(int(seed).to_bytes(8, "little"))
    digest.update(repr(tuple(image.shape)).encode())
    digest.update(image.detach().float().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1  # [0, 2**63), what torch.Generator accepts


def iter_noisy_features(
    encode: Encoder,
    x: torch.Tensor,
    noise_std: NoiseStd,
    n: int,
    *,
    seed: int = 0,
    chunk_size: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """Yield the encoder's features (k, B, ...) of chunks of k noisy copies, n in all.

    ``noise_std`` is a float or a tensor broadcastable to one image (e.g. (C, 1, 1) per-channel std in
    a normalised pixel space). Image b's i-th copy is x[b] + std * (the i-th float32 draw of b's own
    generator, seeded by :func:`image_noise_seed`) on x's device; the noisy input is cast back to x's
    dtype just before the encoder. ``n`` may be 1 here (generate's n0); certificates check n >= 2 themselves.
    """
    check_n(n, minimum=1)
    seed = check_seed(seed)
    chunk_size = check_chunk_size(chunk_size) or DEFAULT_CHUNK_SIZE
    generators = [torch.Generator(device=x.device).manual_seed(image_noise_seed(seed, image)) for image in x]
    image_shape = tuple(x.shape[1:])
    base = x.float()
    std = noise_std.to(device=x.device, dtype=torch.float32) if isinstance(noise_std, torch.Tensor) else float(noise_std)
    track_grad = torch.is_grad_enabled() and base.requires_grad  # attacks differentiate through the copies
    # Without autograd nothing keeps a chunk's copies once its features are out, so one buffer serves
    # every chunk (no fresh multi-MB allocation, and its page faults, per chunk). With autograd the
    # encoder may have saved its input for backward, so each chunk gets its own buffer.
    reuse = not torch.is_grad_enabled()
    buffer = None
    done = 0
    while done < n:
        k = min(chunk_size, n - done)
        # each image's draws written in place (a contiguous slice gets exactly the values
        # torch.randn(image_shape, generator=g) would return), then scaled and shifted in place:
        # the same float32 copies as base + noise * std, without stacked or temporary copies
        if buffer is None or not reuse:
            buffer = torch.empty((k,) + tuple(x.shape), dtype=torch.float32, device=x.device)
        noisy = buffer[:k]
        for copy in noisy:
            for image_noise, generator in zip(copy, generators):
                image_noise.normal_(generator=generator)
        noisy.mul_(std)
        noisy = noisy + base if track_grad else noisy.add_(base)
        noisy = noisy.view((k * x.shape[0],) + image_shape)
        features = encode(noisy if x.dtype == torch.float32 else noisy.to(x.dtype))
        yield features.reshape((k, x.shape[0]) + features.shape[1:])
        done += k


class MonteCarloPass(NamedTuple):
    mean_unit: Optional[torch.Tensor]  # Monte-Carlo estimate of F(x), float32, norm <= 1 (None with mean=False)
    mean_norm: Optional[torch.Tensor]  # mean feature norm (per image, or per token) (None with mean=False)
    scores: Optional[torch.Tensor]  # (n, B[, ..., T]) float64 Y_i = (1 + cos(f(x+e_i), reference)) / 2, or None
    dtype: torch.dtype  # the encoder's output dtype


def monte_carlo_pass(
    encode: Encoder,
    x: torch.Tensor,
    noise_std: NoiseStd,
    n: int,
    *,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    normalize: str = DEFAULT_NORMALIZE,
    reference_unit: Optional[torch.Tensor] = None,
    mean: bool = True,
) -> MonteCarloPass:
    """The one sampling loop every estimator reduces over (locuslab's ``_sample_noise``): running sums of
    the unit features and norms (the smoothed direction), and, given the clean unit features
    ``reference_unit``, the robustness-score samples the certificates are computed from.

    ``mean=False`` (certification, which needs only the scores) skips the running sums and the unit
    features themselves: a score's cosine is <f, reference> / |f| either way, so the scores are the same
    bit for bit, for a third fewer passes over the features.
    """
    check_choice(normalize, "normalize", NORMALIZE_MODES)
    if not mean and reference_unit is None:
        raise ValueError("monte_carlo_pass(mean=False) computes only the scores, so it needs reference_unit")
    direction_sum = None
    norm_sum = None
    scores = _HostScores(n)
    invalid = None  # on an accelerator: the norms' validity flags of every chunk so far, OR-ed there
    dtype = torch.float32
    in_place = not torch.is_grad_enabled()  # attacks differentiate through the sums: keep those out of place
    for features in iter_noisy_features(encode, x, noise_std, n, seed=seed, chunk_size=chunk_size):
        dtype = features.dtype
        values, norms = _float_features_and_unchecked_norms(features, normalize, batch_dims=2)
        flags = invalid_norms(norms)
        if checks_each_chunk(features.device):
            raise_for_invalid_norms(flags)
        else:
            invalid = flags if invalid is None else invalid | flags
        if mean:
            unit_sum = (values / broadcast_norms(norms, values.ndim)).sum(0)
            if direction_sum is None:
                direction_sum, norm_sum = unit_sum, norms.sum(0)
            elif in_place:
                direction_sum.add_(unit_sum)
                norm_sum.add_(norms.sum(0))
            else:
                direction_sum, norm_sum = direction_sum + unit_sum, norm_sum + norms.sum(0)
        if reference_unit is not None:
            product = values * reference_unit.unsqueeze(0)
            cos = (product.flatten(2).sum(-1) if normalize == "global" else product.sum(-1)) / norms
            scores.add(((1 + cos) / 2).clamp(0, 1).detach())
    if invalid is not None:  # before anything is returned: a result is never computed from invalid features
        raise_for_invalid_norms(invalid)
    if not mean:
        return MonteCarloPass(None, None, scores.result(), dtype)
    return MonteCarloPass(direction_sum / n, norm_sum / n, scores.result(), dtype)


def checks_each_chunk(device: torch.device) -> bool:
    """Whether the pass reads the norms' validity flags per chunk: on a CPU that costs nothing and a broken
    encoder fails at its first bad chunk; on an accelerator every read makes the host wait for the device
    (which then idles while the host launches the next chunk), so the flags are OR-ed there and read once,
    after the last chunk."""
    return device.type == "cpu"


class _HostScores:
    """The (n, B[, ..., T]) float64 scores on the host, filled chunk by chunk in one buffer (no per-chunk
    tensors kept alive, no buffer on the device that grows with n).

    From a CUDA device each chunk is copied without waiting, into pinned memory of the chunk's own dtype
    (float32, or float64 with a float64 reference), and :meth:`result` waits for the device once; from
    elsewhere each chunk is copied straight into float64. float32 -> float64 is exact, so the scores are
    the same bits either way."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.buffer: Optional[torch.Tensor] = None
        self.device: Optional[torch.device] = None
        self.asynchronous = False
        self.done = 0

    def add(self, chunk: torch.Tensor) -> None:
        if self.buffer is None:
            self.device = chunk.device
            self.asynchronous = self.device.type == "cuda"
            self.buffer = torch.empty((self.n,) + tuple(chunk.shape[1:]), pin_memory=self.asynchronous,
                                      dtype=chunk.dtype if self.asynchronous else torch.float64)
        self.buffer[self.done:self.done + chunk.shape[0]].copy_(chunk, non_blocking=self.asynchronous)
        self.done += chunk.shape[0]

    def result(self) -> Optional[torch.Tensor]:
        if self.asynchronous:
            torch.cuda.current_stream(self.device).synchronize()  # the copies made without waiting have landed
        return None if self.buffer is None else self.buffer.double()


def smoothed_mean(
    encode: Encoder,
    x: torch.Tensor,
    noise_std: NoiseStd,
    n: int,
    *,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    normalize: str = DEFAULT_NORMALIZE,
) -> SmoothedMean:
    """Monte-Carlo estimate of F(x) = E f(x + e) (float32, norm <= 1) and the mean feature norm.

    Kept as running sums over chunks. The mean norm is per image (global) or per token (token).
    """
    result = monte_carlo_pass(encode, x, noise_std, n, seed=seed, chunk_size=chunk_size, normalize=normalize)
    return SmoothedMean(result.mean_unit, result.mean_norm, result.dtype)


def rescale_direction(mean_unit: torch.Tensor, mean_norm: torch.Tensor, normalize: str) -> torch.Tensor:
    """The decoder gets the direction of F's estimate at the feature scale it expects (cosine is scale-free)."""
    direction, _ = unit_features(mean_unit, normalize, batch_dims=1)
    return direction * broadcast_norms(mean_norm, direction.ndim)


def smooth_features(encoder: Encoder, images: torch.Tensor, config: Optional[FSConfig] = None) -> torch.Tensor:
    """Feature-space smoothed features of a batch of [0,1] images, for any encoder.

    The direction of the Monte-Carlo estimate of F(x) = E_e f(x + e), f the unit-normalised features
    (per image, or per token with ``normalize="token"``), over ``config.n_samples`` Gaussian copies of
    each image (not clamped), rescaled to the mean feature norm over the copies: what a patched model's
    decoder receives. Runs under ``torch.inference_mode`` (no gradients).

    Args:
        encoder: any callable mapping a batch (b, ...) of [0,1] pixels to features (b, ...); it is called
            on chunks of noisy copies.
        images: float tensor (B, ...) of [0,1] pixels, batch first.
        config: an FSConfig (default ``FSConfig()``): ``sigma`` (noise std in [0,1] pixel space),
            ``n_samples``, ``seed``, ``chunk_size`` and ``normalize`` are used.

    Returns:
        Smoothed features of the encoder's output shape (B, ...) and dtype.

    Raises:
        ValueError: a config that is not an FSConfig; images that are not a tensor, have no batch
            dimension, are not floating point, are empty, not finite or outside [0, 1]; or an encoder
            that returns all-zero or non-finite features.
    """
    if config is None:
        config = FSConfig()
    elif not isinstance(config, FSConfig):
        raise ValueError(f"config must be an fs_mllm.FSConfig or None, got {type(config).__name__}")
    check_images(images)
    with torch.inference_mode():
        mean = smoothed_mean(
            encoder, images, config.sigma, config.n_samples,
            seed=config.seed, chunk_size=config.chunk_size, normalize=config.normalize,
        )
    return rescale_direction(mean.mean_unit, mean.mean_norm, config.normalize).to(mean.dtype)

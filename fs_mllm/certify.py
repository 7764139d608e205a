"""Sound Monte-Carlo certification of smoothed features (FCSB) and of cosine-similarity predictions.

Every certificate speaks about the *exact* smoothed encoder F(x) = E f(x + e), not about the n0-sample
estimate used inside ``generate``, and holds per image with probability >= 1 - alpha over the
certification noise.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import stats
from .adapters.base import get_adapter, unwrap_model
from .config import CertifyConfig, DEFAULT_NORMALIZE, FSConfig, check_n, check_sigma
from .normalization import resolve_mean_std
from .smoothed_path import FSState, encoded_groups
from .smoothing import Encoder, NoiseStd, check_images, monte_carlo_pass, unit_features


@dataclass
class Certificate:
    """Certificate of one image: cos(F(x'), F(x)) >= fcsb(r) for all ||x' - x||_2 <= r, w.p. >= 1 - alpha.

    F is the exact smoothed (and boosted, with a booster) encoder, not the n0-copy estimate ``generate``
    uses; the probability is over the certification noise. In token mode each visual token is smoothed
    and certified on its own, at level alpha / T (union bound), so ``fcsb(r)``, from the smallest
    per-token bound, holds for all T tokens at once.

    Attributes:
        score_mean: mean of the n samples Y_i = (1 + cos(f(x + e_i), f(x))) / 2 (over all tokens in token
            mode): the estimate of S(x).
        score_lower: the one-sided (1 - alpha) lower confidence bound on S(x) that ``fcsb`` and
            ``radius`` use (token mode: the minimum of the per-token bounds).
        n: Monte-Carlo samples drawn.
        alpha: failure probability of the certificate.
        sigma: Gaussian noise std in [0,1] pixel space.
        method: the bound: "hoeffding", "bernstein", "betting" or "betting_fixed".
        normalize: "global" (one unit vector per image) or "token".
        token_score_mean: token mode: per-token score means, shape (T,) (T the visual tokens, leading
            feature axes flattened); None in global mode.
        token_score_lower: token mode: per-token lower bounds at level alpha / T, shape (T,); None in
            global mode.
    """

    score_mean: float
    score_lower: float
    n: int
    alpha: float
    sigma: float
    method: str
    normalize: str = DEFAULT_NORMALIZE
    token_score_mean: Optional[np.ndarray] = None
    token_score_lower: Optional[np.ndarray] = None

    def fcsb(self, radius: float) -> float:
        """The certified lower bound on cos(F(x'), F(x)) for every ||x' - x||_2 <= radius.

        Args:
            radius: l2 radius in [0,1] pixel space, >= 0 (a float, or an array for several).

        Returns:
            The bound, in [0, 1], or -1.0 (no guarantee); an array for an array radius.

        Raises:
            ValueError: a negative or non-finite radius.
        """
        return stats.fcsb(self.score_lower, radius, self.sigma)

    def radius(self, threshold: float = 0.0) -> float:
        """The largest l2 radius at which the certified cosine is still at least ``threshold``.

        Args:
            threshold: the cosine to guarantee, in [0, 1).

        Returns:
            The radius, l2 in [0,1] pixel space, >= 0.

        Raises:
            ValueError: a threshold outside [0, 1).
        """
        return stats.certified_radius(self.score_lower, self.sigma, threshold)

    def token_fcsb(self, radius: float) -> np.ndarray:
        """Token mode: each token's certified bound at ``radius`` (all hold at once, w.p. >= 1 - alpha).

        Args:
            radius: l2 radius in [0,1] pixel space, >= 0.

        Returns:
            Bounds of shape (T,), each in [0, 1] or -1.0 (no guarantee).

        Raises:
            ValueError: a certificate made in global mode, or a negative or non-finite radius.
        """
        if self.token_score_lower is None:
            raise ValueError("token_fcsb needs a certificate made with normalize='token'")
        return stats.fcsb(self.token_score_lower, radius, self.sigma)

    def to_dict(self) -> dict:
        """The certificate as JSON-serialisable data.

        Returns:
            {field name: value}, the per-token arrays as lists (None in global mode).
        """
        out = {k: getattr(self, k) for k in ("score_mean", "score_lower", "n", "alpha", "sigma", "method", "normalize")}
        for key in ("token_score_mean", "token_score_lower"):
            value = getattr(self, key)
            out[key] = None if value is None else np.asarray(value).tolist()
        return out


def sample_scores(
    encoder: Encoder,
    x: torch.Tensor,
    noise_std: NoiseStd,
    n: int,
    *,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    normalize: str = DEFAULT_NORMALIZE,
    clean_features: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Y_i = (1 + cos(f(x + e_i), f(x))) / 2 for n noise draws: shape (n, B) global, (n, B, ..., T) token.

    ``clean_features``: encoder(x) when the caller already has it (saves one forward).
    """
    with torch.inference_mode():
        clean, _ = unit_features(encoder(x) if clean_features is None else clean_features, normalize, batch_dims=1)
        return monte_carlo_pass(encoder, x, noise_std, n, seed=seed, chunk_size=chunk_size, normalize=normalize,
                                reference_unit=clean, mean=False).scores


def certificates_from_scores(scores: torch.Tensor, alpha: float, sigma: float, method: str, normalize: str) -> list[Certificate]:
    """Turn sampled scores (n, B[, tokens]) into one Certificate per image."""
    n = scores.shape[0]
    per_image = scores.movedim(0, -1).numpy()  # (B, n) or (B, ..., T, n)
    certificates = []
    for image_scores in per_image:
        if normalize == "global":
            lower = stats.score_lower_bound(image_scores, alpha, method)
            certificates.append(Certificate(float(image_scores.mean()), float(lower), n, alpha, sigma, method, normalize))
        else:
            token_scores = image_scores.reshape(-1, n)
            token_alpha = alpha / token_scores.shape[0]
            token_lower = stats.score_lower_bound(token_scores, token_alpha, method)
            certificates.append(Certificate(
                float(token_scores.mean()), float(token_lower.min()), n, alpha, sigma, method, normalize,
                token_score_mean=token_scores.mean(-1), token_score_lower=np.asarray(token_lower),
            ))
    return certificates


def certify_features(
    encoder: Encoder,
    images: torch.Tensor,
    sigma: float,
    n: int = CertifyConfig.n,
    alpha: float = CertifyConfig.alpha,
    method: str = CertifyConfig.method,
    chunk_size: Optional[int] = None,
    seed: int = 0,
    normalize: str = DEFAULT_NORMALIZE,
) -> list[Certificate]:
    """Certify the smoothed features of each image: a lower bound on cos(F(x'), F(x)) over an l2 ball.

    Draws n Gaussian copies of each image, computes the robustness score samples
    Y_i = (1 + cos(f(x + e_i), f(x))) / 2 and a one-sided (1 - alpha) lower bound on S(x) with ``method``;
    the certificate's ``fcsb(r)`` is then the FCSB at l2 radius r. Runs under ``torch.inference_mode``.

    Args:
        encoder: maps a batch (b, ...) of [0,1] pixels to features (b, ...); called on chunks of noisy copies.
        images: float tensor (B, ...) of [0,1] pixels, batch first.
        sigma: Gaussian noise std in [0,1] pixel space, in (0, 10].
        n: Monte-Carlo samples per image, >= 2.
        alpha: failure probability of each certificate, in (0, 1).
        method: "hoeffding", "bernstein", "betting" or "betting_fixed" (see ``fs_mllm.score_lower_bound``).
        chunk_size: noisy copies per encoder call (None = 32); the noise drawn does not depend on it.
        seed: noise seed, 0 <= seed < 2**63; each image's stream derives from it and the image's pixels.
        normalize: "global" (one unit vector per image) or "token" (each visual token, the last axis
            being the feature axis, certified on its own; see ``Certificate``).

    Returns:
        B ``Certificate`` objects, in batch order.

    Raises:
        ValueError: images that are not a tensor, have no batch dimension, are not floating point, are
            empty, not finite or outside [0, 1]; n < 2; sigma, alpha, method, seed, chunk_size or
            normalize out of range; an encoder that returns all-zero or non-finite features.
    """
    config = FSConfig(sigma=sigma, seed=seed, chunk_size=chunk_size, normalize=normalize, alpha=alpha, method=method)
    check_n(n)
    check_images(images)
    return _certify_encoder(encoder, images, config, n)


def _certify_encoder(encoder: Encoder, images: torch.Tensor, config: FSConfig, n: int,
                     clean_features: Optional[torch.Tensor] = None) -> list[Certificate]:
    """certify_features once config, n and images are checked; ``clean_features``: f(x), when the caller needs that vector."""
    scores = sample_scores(encoder, images, config.sigma, n, seed=config.seed, chunk_size=config.chunk_size,
                           normalize=config.normalize, clean_features=clean_features)
    return certificates_from_scores(scores, config.alpha, config.sigma, config.method, config.normalize)


ABSTAIN = -1  # PredictionCertificate.label when the smoothed prediction at x cannot be certified


@dataclass
class PredictionCertificate:
    """Prediction of the smoothed cosine-similarity predictor, certified on an l2 ball (w.p. >= 1 - alpha).

    Attributes:
        label: the class the smoothed predictor returns at x and everywhere within l2 ``radius``, or
            ABSTAIN (-1) with radius 0.0 when no ball, not even {x}, can be certified: then the smoothed
            prediction at x is unknown, and returning the clean encoder's class would be a different
            predictor's answer.
        radius: certified l2 radius in [0,1] pixel space (> 0 exactly when ``label`` is not ABSTAIN).
        margin_angle: half the angle gap, in radians, between the runner-up and the closest class to f(x).
        certificate: the feature ``Certificate`` (S lower bound) the radius comes from.
        clean_label: the class closest to the clean (unsmoothed) f(x); informational, not certified.
    """

    label: int
    radius: float
    margin_angle: float
    certificate: Certificate
    clean_label: int = ABSTAIN

    @property
    def certified(self) -> bool:
        """True unless the prediction abstained (``label`` is ABSTAIN)."""
        return self.label != ABSTAIN


def certify_prediction(
    encoder: Encoder,
    images: torch.Tensor,
    class_embeddings: torch.Tensor,
    sigma: float,
    n: int = CertifyConfig.n,
    alpha: float = CertifyConfig.alpha,
    method: str = CertifyConfig.method,
    chunk_size: Optional[int] = None,
    seed: int = 0,
) -> list[PredictionCertificate]:
    """Certify the class of the smallest angle between F(x') and the class embeddings, per image.

    With theta = arccos(FCSB(eps)) and angles a_k = angle(f(x), t_k), the smoothed prediction is the
    clean argmin A on the whole ball when a_A + theta < a_B - theta for the runner-up B, i.e.
    FCSB(eps) > cos((a_B - a_A) / 2); the largest such eps is ``certified_radius(S_low, sigma,
    threshold=cos((a_B - a_A) / 2))``. Only a positive radius ties A to the smoothed predictor (the
    ball contains x), so a zero radius abstains (label ABSTAIN) instead of reporting A.

    Args:
        encoder: maps a batch (b, ...) of [0,1] pixels to features (b, ...), flattened to D per image.
        images: float tensor (B, ...) of [0,1] pixels, batch first.
        class_embeddings: float tensor (K, D) of class (e.g. text) embeddings, K >= 2, finite, no zero row.
        sigma: Gaussian noise std in [0,1] pixel space, in (0, 10].
        n: Monte-Carlo samples per image, >= 2.
        alpha: failure probability of each certificate, in (0, 1).
        method: "hoeffding", "bernstein", "betting" or "betting_fixed".
        chunk_size: noisy copies per encoder call (None = 32).
        seed: noise seed, 0 <= seed < 2**63.

    Returns:
        B ``PredictionCertificate`` objects, in batch order (radius l2 in [0,1] pixel space).

    Raises:
        ValueError: bad images (as ``certify_features``); class embeddings that are not a float
            (K >= 2, D) tensor of finite, non-zero rows, or whose D is not the features' size; n < 2;
            sigma, alpha, method, seed or chunk_size out of range.
    """
    classes = _check_class_embeddings(class_embeddings, "class_embeddings")
    config = FSConfig(sigma=sigma, seed=seed, chunk_size=chunk_size, normalize="global", alpha=alpha, method=method)
    check_n(n)
    check_images(images)
    with torch.inference_mode():  # one clean pass: the angle argument needs the f(x) that S was measured against
        clean = encoder(images)
    _check_dims(clean, classes, "class_embeddings")  # before the n forwards, not after
    certificates = _certify_encoder(encoder, images, config, n, clean_features=clean)
    return prediction_certificates(certificates, clean, classes, "class_embeddings")


def _check_class_embeddings(value: Any, name: str) -> torch.Tensor:
    """A (num_classes >= 2, dim) floating tensor of finite, non-zero class embeddings."""
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] < 2 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a floating-point (num_classes >= 2, dim) tensor of class/text embeddings, got {shape}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contain NaN or Inf")
    if (value.norm(dim=1) == 0).any():
        raise ValueError(f"{name} contain an all-zero row, whose direction (and so its angle to the image) is undefined")
    return value


def _check_dims(clean: torch.Tensor, classes: torch.Tensor, name: str) -> None:
    dim = clean[0].numel()
    if dim != classes.shape[1]:
        raise ValueError(f"{name} have dim {classes.shape[1]} but the image features have dim {dim}")


def prediction_certificates(certificates: Sequence[Certificate], clean: torch.Tensor, classes: torch.Tensor,
                            name: str = "class_embeddings") -> list[PredictionCertificate]:
    """The reduction of :func:`certify_prediction`: feature certificates + clean f(x) + class embeddings ->
    per-image certified class and radius (the angle argument in its docstring)."""
    clean = clean.detach().flatten(1)
    _check_dims(clean, classes, name)
    unit_features(clean)  # refuses zero or non-finite features (the class embeddings were checked already)
    # in float64: arccos near 1 in float32 can overstate a margin, and so the radius
    clean_unit = torch.nn.functional.normalize(clean.double(), dim=-1)
    class_unit = torch.nn.functional.normalize(classes.detach().double().to(clean.device), dim=-1)
    angles = torch.arccos((clean_unit @ class_unit.T).clamp(-1, 1))  # (B, K)
    results = []
    for image_angles, certificate in zip(angles, certificates):
        ordered = torch.sort(image_angles)
        clean_label = int(ordered.indices[0])
        margin = float(ordered.values[1] - ordered.values[0]) / 2
        threshold = math.cos(margin)
        radius = 0.0 if threshold >= 1.0 else float(stats.certified_radius(certificate.score_lower, certificate.sigma, threshold))
        label = clean_label if radius > 0 else ABSTAIN
        results.append(PredictionCertificate(label, radius, margin, certificate, clean_label))
    return results


# ---------------------------------------------------------------------------------------------
# certifying the features that feed a multimodal LLM's decoder
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelCertificate(Certificate):
    """A ``Certificate`` (every field and method of it) plus the bound at the radius asked for.

    Attributes:
        radius_checked: the ``radius`` passed to ``certify_model`` (l2 in [0,1] pixel space), or None.
        bound: ``fcsb(radius_checked)``, the certified cosine bound there (-1.0: no guarantee), or None.
    """

    radius_checked: Optional[float] = None
    bound: Optional[float] = None


def certify_model(
    model: nn.Module,
    images_or_pixel_values: Union[torch.Tensor, Mapping[str, Any]],
    radius: Optional[float] = None,
    n: int = CertifyConfig.n,
    alpha: Optional[float] = None,
    method: Optional[str] = None,
    sigma: Optional[float] = None,
    normalize: Optional[str] = None,
    seed: Optional[int] = None,
    chunk_size: Optional[int] = None,
    processor: Any = None,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    **model_inputs: Any,
) -> list[ModelCertificate]:
    """Certify the smoothed features that feed the language decoder, one certificate per image.

    The certificate is about the exact smoothed (boosted, with the patch's booster) encoder F and holds
    per image with probability >= 1 - alpha; it runs the noisy copies through the model's own image
    path, as the patch does. For a patched model every setting left None comes from the patch's
    FSConfig, and mean/std and booster from the patch; for an unpatched model ``sigma`` is required and
    the rest default to FSConfig's defaults.

    Args:
        model: a transformers multimodal model of a supported family (or a PEFT wrapper), patched or not.
        images_or_pixel_values: [0,1] images (B, 3, H, W) at the processor's resolution (converted with
            the adapter and the mean/std), or processor outputs (a dict with normalised ``pixel_values``
            and the family kwargs).
        radius: None, or an l2 radius in [0,1] pixel space (>= 0) at which each result also carries the
            bound (``ModelCertificate.bound``).
        n: Monte-Carlo samples per image, >= 2.
        alpha: failure probability of each certificate, in (0, 1) (None: the patch's).
        method: "hoeffding", "bernstein", "betting" or "betting_fixed" (None: the patch's).
        sigma: Gaussian noise std in [0,1] pixel space: required for an unpatched model; for a patched
            one, None or the patch's sigma.
        normalize: "global" or "token" (None: the patch's).
        seed: noise seed (None: the patch's).
        chunk_size: noisy copies per encoder call (None: the patch's).
        processor: source of the mean/std, as in ``fs_mllm.patch_model`` (None: the patch's, or for
            an unpatched model the saved preprocessor config, else the family default).
        image_mean: per-channel mean (3 floats), with ``image_std``.
        image_std: per-channel std (3 positive floats), with ``image_mean``.
        **model_inputs: family kwargs for [0,1] images (e.g. ``image_sizes``), or more processor outputs.

    Returns:
        B ``ModelCertificate`` objects, in image order.

    Raises:
        ValueError: n < 2; a negative or non-finite radius; a sigma other than the patch's, or none for
            an unpatched model; images or pixel values that are not finite floats (images also in
            [0, 1]); a model of an unsupported family; mean/std or settings out of range; all-zero or
            non-finite features.
    """
    check_n(n)
    if radius is not None:
        radius = _check_radius(radius)
    pass_ = _SmoothedPass.prepare(model, images_or_pixel_values, sigma, processor, image_mean, image_std, model_inputs,
                                  normalize=normalize, seed=seed, chunk_size=chunk_size, alpha=alpha, method=method)
    config = pass_.state.config
    results: dict[int, ModelCertificate] = {}
    for indices, x, encode in pass_.groups():
        scores = sample_scores(encode, x, pass_.noise_std, n, seed=config.seed, chunk_size=config.chunk_size, normalize=config.normalize)
        for index, cert in zip(indices, certificates_from_scores(scores, config.alpha, config.sigma, config.method, config.normalize)):
            bound = None if radius is None else float(cert.fcsb(radius))
            results[index] = ModelCertificate(**cert.__dict__, radius_checked=radius, bound=bound)
    return [results[i] for i in range(len(results))]


@dataclass
class _SmoothedPass:
    """One call of a model's image-feature function, resolved the way the patch runs it (certify_model and
    certify_zero_shot both reduce over :meth:`groups`, i.e. fs_mllm.smoothed_path.encoded_groups)."""

    model: nn.Module
    state: FSState
    original: Callable
    pixel_values: torch.Tensor
    kwargs: dict
    leftover: dict  # the inputs the image-feature function does not take (e.g. a processor's input_ids)

    @property
    def noise_std(self) -> torch.Tensor:
        return self.state.adapter.noise_std(self.state.config.sigma, self.state.image_std)

    def groups(self) -> Iterator[tuple[list[int], torch.Tensor, Encoder]]:
        return encoded_groups(self.model, self.original, self.state, self.pixel_values, self.kwargs)

    @classmethod
    def prepare(cls, model: nn.Module, images_or_pixel_values: Any, sigma: Optional[float], processor: Any,
                image_mean: Optional[Sequence[float]], image_std: Optional[Sequence[float]], model_inputs: dict,
                **settings: Any) -> "_SmoothedPass":
        """For a patched model sigma, mean/std, booster and every FSConfig field in ``settings`` left None come
        from the patch (a differing sigma is an error); for an unpatched model ``sigma`` is required and the
        rest default to FSConfig's defaults. [0,1] images go through the adapter's normalisation."""
        from .patching import get_fs_state, is_patched, original_feature_function

        hf_model = unwrap_model(model)
        adapter = get_adapter(hf_model)
        overrides = {k: v for k, v in settings.items() if v is not None}  # None = the patch's value
        if is_patched(hf_model):
            state = get_fs_state(hf_model)
            if sigma is not None and check_sigma(sigma) != state.config.sigma:
                raise ValueError(f"sigma={sigma} differs from the patch's sigma={state.config.sigma}; omit sigma or re-patch")
            config = state.config.replace(**overrides)
            if image_mean is not None or image_std is not None or processor is not None:
                mean, std = resolve_mean_std(hf_model, adapter, processor, image_mean, image_std)
            else:
                mean, std = state.image_mean, state.image_std
            state = FSState(config, adapter, mean, std, state.booster)
        else:
            if sigma is None:
                raise ValueError("sigma is required to certify an unpatched model (or patch it first with patch_model)")
            config = FSConfig(sigma=sigma, **overrides)
            mean, std = resolve_mean_std(hf_model, adapter, processor, image_mean, image_std)
            state = FSState(config, adapter, mean, std, None)

        if isinstance(images_or_pixel_values, torch.Tensor):
            check_images(images_or_pixel_values, "images_or_pixel_values")
            inputs = adapter.pixels_to_model_inputs(hf_model, images_or_pixel_values, state.image_mean, state.image_std, **model_inputs)
        elif isinstance(images_or_pixel_values, Mapping) and "pixel_values" in images_or_pixel_values:
            check_images(images_or_pixel_values["pixel_values"], "images_or_pixel_values['pixel_values']", unit_range=False)
            inputs = {**dict(images_or_pixel_values), **model_inputs}
        else:
            raise ValueError(
                "images_or_pixel_values must be [0,1] images (B, 3, H, W) or processor outputs (a dict with pixel_values)"
            )
        original = original_feature_function(hf_model, adapter)
        signature_keys = set(_signature_params(original))
        pixel_values = inputs.pop("pixel_values")
        kwargs = {k: v for k, v in inputs.items() if k in signature_keys}
        leftover = {k: v for k, v in inputs.items() if k not in signature_keys}
        pixel_values = pixel_values.to(_input_device(hf_model, pixel_values))
        return cls(hf_model, state, original, pixel_values, kwargs, leftover)


def certify_zero_shot(
    model: nn.Module,
    images_or_pixel_values: Union[torch.Tensor, Mapping[str, Any]],
    text_embeddings: Union[torch.Tensor, Mapping[str, Any], None] = None,
    n: int = CertifyConfig.n,
    alpha: Optional[float] = None,
    method: Optional[str] = None,
    sigma: Optional[float] = None,
    seed: Optional[int] = None,
    chunk_size: Optional[int] = None,
    processor: Any = None,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    **model_inputs: Any,
) -> list[PredictionCertificate]:
    """Certify a dual encoder's (CLIP, SigLIP, ...) zero-shot class per image: the paper's CLIP classification setting.

    The smoothed classifier returns argmax_k cos(F(x), t_k), F the smoothed image embedding that the patched
    ``get_image_features`` estimates with n_samples copies; this certifies it with ``certify_prediction``'s
    argument, on the noisy copies of the model's own smoothed path (so what is certified is what is deployed).
    Each result's ``label`` holds on the l2 ball of ``radius`` in [0,1] pixel space w.p. >= 1 - alpha, or is
    ABSTAIN. Settings resolve as in ``certify_model`` (the patch's, or ``sigma=`` for an unpatched model).

    Args:
        model: a dual encoder of a supported family (or a PEFT wrapper), patched or not.
        images_or_pixel_values: [0,1] images (B, 3, H, W) at the processor's resolution, or processor
            outputs (a dict with ``pixel_values`` and the family kwargs).
        text_embeddings: float class embeddings (K, D), K >= 2; or tokenizer outputs (a dict with
            ``input_ids``, ``attention_mask``, ...) embedded with ``model.get_text_features``; or None to
            take the ``input_ids`` of a processor output passed as ``images_or_pixel_values``.
        n: Monte-Carlo samples per image, >= 2.
        alpha: failure probability of each certificate, in (0, 1) (None: the patch's).
        method: "hoeffding", "bernstein", "betting" or "betting_fixed" (None: the patch's).
        sigma: Gaussian noise std in [0,1] pixel space: required for an unpatched model; for a patched
            one, None or the patch's sigma.
        seed: noise seed (None: the patch's).
        chunk_size: noisy copies per encoder call (None: the patch's).
        processor: source of the mean/std, as in ``certify_model``.
        image_mean: per-channel mean (3 floats), with ``image_std``.
        image_std: per-channel std (3 positive floats), with ``image_mean``.
        **model_inputs: family kwargs for [0,1] images, or more processor outputs.

    Returns:
        B ``PredictionCertificate`` objects, in image order.

    Raises:
        ValueError: a generative MLLM (use ``certify_model``); no text embeddings to be found; an
            integer tensor or tokenizer outputs without ``input_ids`` as ``text_embeddings``; class
            embeddings that are not (K >= 2, D) finite non-zero rows with D the image embedding's size;
            and what ``certify_model`` refuses.
    """
    check_n(n)
    if get_adapter(model).generates:
        raise ValueError(f"model: certify_zero_shot needs a dual encoder (CLIP, SigLIP, ...), got {type(unwrap_model(model)).__name__}; "
                         "for a multimodal LLM use certify_model (features) or certify_prediction (an encoder + class embeddings)")
    pass_ = _SmoothedPass.prepare(model, images_or_pixel_values, sigma, processor, image_mean, image_std, model_inputs,
                                  normalize="global", seed=seed, chunk_size=chunk_size, alpha=alpha, method=method)
    if text_embeddings is None:
        if "input_ids" not in pass_.leftover:
            raise ValueError("text_embeddings is required: (K, D) class embeddings or tokenizer outputs with input_ids "
                             "(or pass a processor output holding both pixel_values and input_ids)")
        text_embeddings = pass_.leftover
    classes = _text_embeddings(pass_.model, text_embeddings)
    config = pass_.state.config
    results: dict[int, PredictionCertificate] = {}
    for indices, x, encode in pass_.groups():
        with torch.inference_mode():
            clean = encode(x)
        _check_dims(clean, classes, "text_embeddings")  # before the n forwards, not after
        scores = sample_scores(encode, x, pass_.noise_std, n, seed=config.seed, chunk_size=config.chunk_size,
                               clean_features=clean)
        certificates = certificates_from_scores(scores, config.alpha, config.sigma, config.method, "global")
        for index, result in zip(indices, prediction_certificates(certificates, clean, classes, "text_embeddings")):
            results[index] = result
    return [results[i] for i in range(len(results))]


def _text_embeddings(model: nn.Module, text: Union[torch.Tensor, Mapping[str, Any]]) -> torch.Tensor:
    """(K, D) class embeddings as given, or ``model.get_text_features`` of tokenizer outputs."""
    if isinstance(text, Mapping):
        if "input_ids" not in text:
            raise ValueError(f"text_embeddings: tokenizer outputs need input_ids, got keys {sorted(text)}")
        keys = set(_signature_params(model.get_text_features))
        device = _input_device(model, text["input_ids"])
        with torch.inference_mode():
            output = model.get_text_features(**{k: v.to(device) for k, v in text.items() if k in keys})
        text = output.pooler_output if hasattr(output, "pooler_output") else output
    elif isinstance(text, torch.Tensor) and not text.is_floating_point():
        raise ValueError(f"text_embeddings: got an integer tensor {tuple(text.shape)} (token ids?); pass tokenizer outputs "
                         "as a dict with input_ids and attention_mask, or float (K, D) text embeddings")
    return _check_class_embeddings(text, "text_embeddings")


def _check_radius(radius: Any) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be None or a finite, non-negative l2 radius in [0,1] pixel space, got {radius!r}")
    return float(radius)


def _signature_params(fn: Callable) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "kwargs"]


def _input_device(model: nn.Module, pixel_values: torch.Tensor) -> torch.device:
    """Certification inputs go where the model's first parameter lives (accelerate hooks move them on)."""
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return pixel_values.device

"""Sound Monte-Carlo certification of smoothed features (FCSB) and of cosine-similarity predictions.

Every certificate speaks about the *exact* smoothed encoder F(x) = E f(x + e), not about the n0-sample
estimate used inside ``generate``, and holds per image with probability >= 1 - alpha over the
certification noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import stats
from .config import FSConfig, check_n
from .smoothing import Encoder, NoiseStd, check_images, iter_noisy_unit_features, unit_features


@dataclass
class Certificate:
    """Certificate of one image: cos(F(x'), F(x)) >= fcsb(r) for all ||x' - x||_2 <= r, w.p. >= 1 - alpha.

    In token mode each visual token t is smoothed and certified on its own; ``token_score_lower`` holds
    the per-token bounds at level alpha / T (union bound), and ``score_lower`` is their minimum, so
    ``fcsb(r)`` holds for all tokens at once.
    """

    score_mean: float
    score_lower: float
    n: int
    alpha: float
    sigma: float
    method: str
    normalize: str = "global"
    token_score_mean: Optional[np.ndarray] = None
    token_score_lower: Optional[np.ndarray] = None

    def fcsb(self, radius: float) -> float:
        return stats.fcsb(self.score_lower, radius, self.sigma)

    def radius(self, threshold: float = 0.0) -> float:
        return stats.certified_radius(self.score_lower, self.sigma, threshold)

    def token_fcsb(self, radius: float) -> np.ndarray:
        if self.token_score_lower is None:
            raise ValueError("token_fcsb needs a certificate made with normalize='token'")
        return stats.fcsb(self.token_score_lower, radius, self.sigma)

    def to_dict(self) -> dict:
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
    normalize: str = "global",
) -> torch.Tensor:
    """Y_i = (1 + cos(f(x + e_i), f(x))) / 2 for n noise draws: shape (n, B) global, (n, B, ..., T) token."""
    with torch.inference_mode():
        clean, _ = unit_features(encoder(x), normalize, batch_dims=1)
        scores = []
        for unit, _, _ in iter_noisy_unit_features(encoder, x, noise_std, n, seed=seed, chunk_size=chunk_size, normalize=normalize):
            if normalize == "global":
                cos = (unit * clean.unsqueeze(0)).flatten(2).sum(-1)
            else:
                cos = (unit * clean.unsqueeze(0)).sum(-1)
            scores.append(((1 + cos) / 2).clamp(0, 1).cpu().double())
    return torch.cat(scores)


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
    n: int = 1000,
    alpha: float = 0.001,
    method: str = "bernstein",
    chunk_size: Optional[int] = None,
    seed: int = 0,
    normalize: str = "global",
) -> list[Certificate]:
    """Certify the smoothed features of each [0,1] image in ``images`` (batch first).

    Draws n Gaussian copies (std sigma in pixel space), computes the robustness score samples
    Y_i = (1 + cos(f(x+e_i), f(x)))/2 and a one-sided (1 - alpha) lower bound on S(x) with ``method``.
    """
    config = FSConfig(sigma=sigma, seed=seed, chunk_size=chunk_size, normalize=normalize, alpha=alpha, method=method)
    check_n(n)
    check_images(images)
    scores = sample_scores(encoder, images, config.sigma, n, seed=config.seed, chunk_size=config.chunk_size, normalize=config.normalize)
    return certificates_from_scores(scores, config.alpha, config.sigma, config.method, config.normalize)


ABSTAIN = -1  # PredictionCertificate.label when the smoothed prediction at x cannot be certified


@dataclass
class PredictionCertificate:
    """Prediction of the smoothed cosine-similarity predictor, certified on an l2 ball (w.p. >= 1 - alpha).

    label: the class the smoothed predictor returns at x and everywhere within l2 ``radius``, or
        ABSTAIN (-1) with radius 0.0 when no ball, not even {x}, can be certified: then the smoothed
        prediction at x is unknown, and returning the clean encoder's class would be a different
        predictor's answer (issue 14).
    radius: certified l2 radius in [0,1] pixel space (> 0 exactly when ``label`` is not ABSTAIN).
    margin_angle: half the angle gap, in radians, between the runner-up and the closest class to f(x).
    clean_label: the class closest to the clean (unsmoothed) f(x); informational, not certified.
    certificate: the feature certificate (S lower bound) the radius comes from.
    """

    label: int
    radius: float
    margin_angle: float
    certificate: Certificate
    clean_label: int = ABSTAIN

    @property
    def certified(self) -> bool:
        return self.label != ABSTAIN


def certify_prediction(
    encoder: Encoder,
    images: torch.Tensor,
    class_embeddings: torch.Tensor,
    sigma: float,
    n: int = 1000,
    alpha: float = 0.001,
    method: str = "bernstein",
    chunk_size: Optional[int] = None,
    seed: int = 0,
) -> list[PredictionCertificate]:
    """Certify the class of the smallest angle between F(x') and the class embeddings (K, D).

    With theta = arccos(FCSB(eps)) and angles a_k = angle(f(x), t_k), the smoothed prediction is the
    clean argmin A on the whole ball when a_A + theta < a_B - theta for the runner-up B, i.e.
    FCSB(eps) > cos((a_B - a_A) / 2); the largest such eps is ``certified_radius(S_low, sigma,
    threshold=cos((a_B - a_A) / 2))``. Only a positive radius ties A to the smoothed predictor (the
    ball contains x), so a zero radius abstains (label ABSTAIN) instead of reporting A.
    """
    if not isinstance(class_embeddings, torch.Tensor) or class_embeddings.ndim != 2 or class_embeddings.shape[0] < 2:
        raise ValueError("class_embeddings must be a (num_classes >= 2, dim) tensor of class/text embeddings")
    certificates = certify_features(encoder, images, sigma, n, alpha, method, chunk_size, seed, "global")
    with torch.inference_mode():
        clean = encoder(images).float().flatten(1)
    if clean.shape[1] != class_embeddings.shape[1]:
        raise ValueError(f"class_embeddings have dim {class_embeddings.shape[1]} but the encoder gives {clean.shape[1]}")
    clean_unit, _ = unit_features(clean)
    classes, _ = unit_features(class_embeddings.float().to(clean.device))
    angles = torch.arccos((clean_unit @ classes.T).clamp(-1, 1))  # (B, K)
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

"""Gaussian Smoothness Booster (GSB): raise the Gaussian robustness score S(x) of a frozen encoder.

FCSB grows with S(x) = E (1 + cos(f(x+e), f(x))) / 2, so a small trainable front end (pixel-space
denoiser) and back end (feature-space mapper) around the frozen vision tower buy a much stronger
certificate without touching the MLLM. The certificate is then about the *boosted* encoder
f_b(x) = unit(map(g(denoise(x, sigma)), sigma)) built by :func:`boosted_encoder`.

Booster protocol (shared with ``fs_mllm.patching``):
- ``denoise(pixels01 (N,3,H,W), sigma) -> pixels`` in [0,1] pixel space, before the vision tower;
- ``map_features(features, sigma) -> features`` on each noisy sample's image features (last dim =
  feature dim), before normalisation;
- ``check_compatible(feature_dim, sigma)`` raises ValueError when the booster was trained for another
  encoder (feature size) or sigma range;
- ``noise_level(pixels01, sigma) -> (N,)``: the level both stages are told. With
  ``noise_level="estimated"`` (default) it is the noise std measured on the input itself
  (:func:`estimate_noise_std`), so a clean image is told ~0 and passes almost unchanged (clean
  utility) while a noisy copy at sigma is told ~sigma; with ``"given"`` it is sigma.

Weights are saved as ``gsb.safetensors`` + ``gsb_config.json`` (never pickle).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..arguments import check_int
from ..config import check_sigma, dataclass_from_dict
from ..smoothed_path import BoosterStages

WEIGHTS_NAME = "gsb.safetensors"
CONFIG_NAME = "gsb_config.json"
FORMAT_VERSION = 1
SIGMA_TOLERANCE = 1e-6

SigmaLike = Union[float, torch.Tensor]
NOISE_LEVELS = ("estimated", "given")
MAD_TO_STD = 0.6744897501960817  # median |N(0,1)|


def _check_pixels(pixels01: Any, min_side: int = 1) -> None:
    """ValueError unless pixels01 is a (N, C, H, W) tensor with H, W >= min_side."""
    if not isinstance(pixels01, torch.Tensor) or pixels01.ndim != 4 or min(pixels01.shape[-2:]) < min_side:
        got = tuple(pixels01.shape) if isinstance(pixels01, torch.Tensor) else type(pixels01).__name__
        raise ValueError(f"pixels01 must be a (N, C, H, W) tensor of [0,1] pixels with H, W >= {min_side}, got {got}")


def estimate_noise_std(pixels01: torch.Tensor) -> torch.Tensor:
    """Std of additive white Gaussian noise per image (N, C, H, W) -> (N,), from the image alone.

    Why: the median absolute diagonal (HH) Haar coefficient over 2x2 blocks, / 0.6745, is the
    classical robust noise estimate (Donoho & Johnstone 1994): for i.i.d. noise of std s the HH
    coefficient has std s, while natural images have few strong diagonal details, so the median
    barely sees them (clean 112 px photos read 0.000-0.015; x + N(0, s^2) reads s within 5%).
    """
    _check_pixels(pixels01, min_side=2)
    y = pixels01.float()[..., : pixels01.shape[-2] // 2 * 2, : pixels01.shape[-1] // 2 * 2]
    hh = (y[..., 0::2, 0::2] - y[..., 0::2, 1::2] - y[..., 1::2, 0::2] + y[..., 1::2, 1::2]) / 2
    return hh.abs().flatten(1).median(dim=1).values / MAD_TO_STD


@dataclass
class GSBConfig:
    """Architecture and provenance of a ``GaussianSmoothnessBooster``, saved as gsb_config.json.

    Validated on construction; ``to_dict``/``from_dict`` round-trip it through JSON.

    Attributes:
        feature_dim: last dim of the image features the mapper sees; the booster refuses an encoder
            with another (``check_compatible``).
        sigma_min: lower end of the noise std range it was trained for, in [0,1] pixel space; a sigma
            outside [sigma_min, sigma_max] is refused.
        sigma_max: upper end of that range, in [0,1] pixel space; also the scale of the sigma embedding
            and the cap of the estimated noise level.
        use_denoiser: whether the pixel-space denoiser exists.
        use_mapper: whether the feature-space mapper exists (at least one of the two must).
        image_channels: channels of the images the denoiser takes (3).
        denoiser_channels: width of the DnCNN/FFDNet denoiser.
        denoiser_depth: its conv layers, >= 2.
        denoiser_downscale: its pixel-unshuffle factor (FFDNet); image height and width must be divisible by it.
        mapper_hidden: width of the mapper's residual MLP.
        mapper_layers: hidden layers of that MLP.
        sigma_embed_dim: size of the FiLM embedding of the noise level.
        encoder_id: free text naming the encoder and feature layout it was trained for (provenance).
        image_size: resolution the denoiser was trained at (informational: it is fully convolutional).
        noise_level: "estimated" (both stages are told the noise std measured on each input, so clean
            inputs pass almost unchanged) or "given" (they are told the smoothing sigma).
        extra: free JSON-serialisable metadata (training set, steps, measured figures).

    Raises:
        ValueError: a field of the wrong type or out of range, sigma_min > sigma_max, or neither stage.
    """

    feature_dim: int
    sigma_min: float = 0.125
    sigma_max: float = 0.5
    use_denoiser: bool = True
    use_mapper: bool = True
    image_channels: int = 3
    denoiser_channels: int = 32
    denoiser_depth: int = 8
    denoiser_downscale: int = 2
    mapper_hidden: int = 512
    mapper_layers: int = 2
    sigma_embed_dim: int = 64
    encoder_id: str = ""
    image_size: Optional[int] = None
    noise_level: str = "estimated"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int(self.feature_dim, "feature_dim")
        self.sigma_min = check_sigma(self.sigma_min, "sigma_min")
        self.sigma_max = check_sigma(self.sigma_max, "sigma_max")
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be <= sigma_max ({self.sigma_max})")
        if not (self.use_denoiser or self.use_mapper):
            raise ValueError("use_denoiser and use_mapper are both False: a booster needs at least one part")
        check_int(self.image_channels, "image_channels")
        check_int(self.denoiser_channels, "denoiser_channels")
        if isinstance(self.denoiser_depth, bool) or not isinstance(self.denoiser_depth, int) or self.denoiser_depth < 2:
            raise ValueError(f"denoiser_depth must be an integer >= 2 (conv layers), got {self.denoiser_depth!r}")
        check_int(self.denoiser_downscale, "denoiser_downscale")
        check_int(self.mapper_hidden, "mapper_hidden")
        check_int(self.mapper_layers, "mapper_layers")
        check_int(self.sigma_embed_dim, "sigma_embed_dim")
        if self.image_size is not None:
            check_int(self.image_size, "image_size")
        if self.noise_level not in NOISE_LEVELS:
            raise ValueError(f"noise_level must be one of {NOISE_LEVELS}, got {self.noise_level!r}")
        if not isinstance(self.encoder_id, str):
            raise ValueError(f"encoder_id must be a string, got {self.encoder_id!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict of JSON-serialisable metadata, got {type(self.extra).__name__}")

    def to_dict(self) -> dict:
        """The config as JSON-serialisable data.

        Returns:
            {field name: value}, what ``from_dict`` reads back.
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GSBConfig":
        """Build a config from JSON data, strictly.

        Args:
            data: {field name: value}; ``feature_dim`` is required, other fields default.

        Returns:
            The validated GSBConfig.

        Raises:
            ValueError: ``data`` is not a dict, names an unknown field, lacks ``feature_dim``, or holds a
                value of the wrong JSON type or out of range.
        """
        return dataclass_from_dict(cls, data)


class SigmaEmbedding(nn.Module):
    """Embed the noise level (scaled by sigma_max so sigma=0 is a valid, 'no noise' input)."""

    def __init__(self, dim: int, sigma_max: float) -> None:
        super().__init__()
        self.sigma_max = sigma_max
        self.net = nn.Sequential(nn.Linear(3, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        s = (sigma.float() / self.sigma_max).reshape(-1, 1)
        return self.net(torch.cat([s, s * s, torch.sqrt(s.clamp_min(0))], dim=-1))


class FiLM(nn.Module):
    """Feature-wise affine modulation h * (1 + gamma(s)) + beta(s), starting at the identity."""

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, channel_dim: int) -> torch.Tensor:
        gamma, beta = self.proj(emb).chunk(2, dim=-1)  # (B, C) each
        shape = [1] * h.ndim
        shape[0] = h.shape[0]
        shape[channel_dim] = h.shape[channel_dim]
        return h * (1 + gamma.reshape(shape)) + beta.reshape(shape)


class SigmaDenoiser(nn.Module):
    """Sigma-conditioned DnCNN/FFDNet in [0,1] pixel space: D(y, s) = y - s * eps_hat(y, s).

    It predicts the unit-variance noise, so it is exactly the identity at s = 0 and (zero final layer)
    starts as the identity for every s. Convolutions run on a pixel-unshuffled copy (FFDNet), which
    makes it cheap next to the vision tower.
    """

    def __init__(self, channels: int, width: int, depth: int, embed_dim: int, sigma_max: float, downscale: int = 1) -> None:
        super().__init__()
        self.embed = SigmaEmbedding(embed_dim, sigma_max)
        self.downscale = downscale
        packed = channels * downscale * downscale
        self.inp = nn.Conv2d(packed + 1, width, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 2))
        self.films = nn.ModuleList(FiLM(embed_dim, width) for _ in range(depth - 2))
        self.out = nn.Conv2d(width, packed, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.sigma_max = sigma_max

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        k = self.downscale
        if y.shape[2] % k or y.shape[3] % k:
            raise ValueError(f"image height/width {tuple(y.shape[2:])} must be divisible by denoiser_downscale={k}")
        sigma = sigma.to(device=y.device, dtype=torch.float32).reshape(-1).expand(y.shape[0])
        emb = self.embed(sigma)
        s = sigma.reshape(-1, 1, 1, 1)
        scale = torch.rsqrt(0.25 + s * s)  # keep the input variance ~1 across noise levels
        packed = F.pixel_unshuffle((y - 0.5) * scale, k) if k > 1 else (y - 0.5) * scale
        level = (s / self.sigma_max).expand(-1, 1, packed.shape[2], packed.shape[3])
        h = F.relu(self.inp(torch.cat([packed, level], dim=1)))
        for conv, film in zip(self.body, self.films):
            h = F.relu(film(conv(h), emb, channel_dim=1))
        eps = self.out(h)
        if k > 1:
            eps = F.pixel_shuffle(eps, k)
        return y - s * eps


class FeatureMapper(nn.Module):
    """Residual, sigma-aware feature map z_m = z + M(z, s) applied to each token (last dim).

    M normalises z (LayerNorm without affine), runs an MLP with FiLM(sigma) after each hidden layer, and
    scales its zero-initialised output by the token's RMS, so it starts as the identity and its
    correction is relative to the feature scale.
    """

    def __init__(self, dim: int, hidden: int, layers: int, embed_dim: int, sigma_max: float) -> None:
        super().__init__()
        self.embed = SigmaEmbedding(embed_dim, sigma_max)
        dims = [dim] + [hidden] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.films = nn.ModuleList(FiLM(embed_dim, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def residual(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """M(z, s) for z of shape (B, ..., D) and sigma of shape (B,) or ()."""
        batch = z.shape[0] if z.ndim >= 2 else 1
        sigma = sigma.to(device=z.device, dtype=torch.float32).reshape(-1).expand(batch)
        emb = self.embed(sigma)  # (B, E)
        zb = z.float().reshape(batch, -1, z.shape[-1])  # (B, T, D)
        rms = zb.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        h = F.layer_norm(zb, (zb.shape[-1],))
        for linear, film in zip(self.linears, self.films):
            h = F.gelu(film(linear(h), emb.unsqueeze(1), channel_dim=2))
        return (self.out(h) * rms).reshape(z.shape)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return z.float() + self.residual(z, sigma)


class GaussianSmoothnessBooster(nn.Module):
    """Gaussian Smoothness Booster: a denoiser (pixels) and a mapper (features) around a frozen encoder.

    Raises the Gaussian robustness score S(x), and so the FCSB, without retraining the model: a
    sigma-conditioned DnCNN/FFDNet denoiser D(y, s) = y - s * eps_hat(y, s) before the vision tower and a
    residual FiLM-conditioned mapper z + M(z, s) after it, both starting as the identity. It implements
    the booster protocol that ``fs_mllm.patch_model`` and ``boosted_encoder`` take; the
    certificate is then about the boosted encoder. Train one with ``fs-mllm train-gsb`` (Booster training page).

    Args:
        config: the architecture (a ``GSBConfig``); weights start at the identity map.

    Raises:
        ValueError: ``config`` is not a GSBConfig.
    """

    def __init__(self, config: GSBConfig) -> None:
        super().__init__()
        if not isinstance(config, GSBConfig):
            raise ValueError(f"config must be a GSBConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.denoiser = (
            SigmaDenoiser(c.image_channels, c.denoiser_channels, c.denoiser_depth, c.sigma_embed_dim, c.sigma_max, c.denoiser_downscale)
            if c.use_denoiser else None
        )
        self.mapper = (
            FeatureMapper(c.feature_dim, c.mapper_hidden, c.mapper_layers, c.sigma_embed_dim, c.sigma_max)
            if c.use_mapper else None
        )

    # ---- protocol -------------------------------------------------------------------------
    def check_compatible(self, feature_dim: int, sigma: float) -> None:
        """Refuse an encoder with another feature size, or a sigma outside the trained range.

        Args:
            feature_dim: last dim of the encoder's features.
            sigma: the smoothing noise std, in [0,1] pixel space.

        Raises:
            ValueError: ``feature_dim`` is not ``config.feature_dim``, or sigma is out of range or outside
                [sigma_min, sigma_max] (to within 1e-6).
        """
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
            raise ValueError(f"feature_dim must be an integer, got {feature_dim!r}")
        if feature_dim != self.config.feature_dim:
            raise ValueError(
                f"feature_dim mismatch: this booster was trained for features of size {self.config.feature_dim} "
                f"(encoder {self.config.encoder_id or 'unspecified'}), got {feature_dim}; train a booster for this encoder"
            )
        sigma = check_sigma(sigma)
        lo, hi = self.config.sigma_min, self.config.sigma_max
        if sigma < lo - SIGMA_TOLERANCE or sigma > hi + SIGMA_TOLERANCE:
            raise ValueError(
                f"sigma={sigma} is outside the range [{lo}, {hi}] this booster was trained for; "
                f"use a sigma in that range or train a booster for it"
            )

    def noise_level(self, pixels01: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """The noise level both stages are told for these pixels (see ``GSBConfig.noise_level``).

        Args:
            pixels01: images (N, C, H, W) in [0,1] pixel space (noisy copies, or clean images); H, W >= 2
                with ``noise_level="estimated"``.
            sigma: the smoothing noise std in [0,1] pixel space, a float or a per-image (N,) tensor; used
                only with ``noise_level="given"``.

        Returns:
            (N,) float32 levels: the noise std estimated on each image, clamped to [0, sigma_max]
            ("estimated"), or sigma ("given").

        Raises:
            ValueError: pixels that are not (N, C, H, W) large enough, or a negative or non-finite sigma.
        """
        _check_pixels(pixels01)
        if self.config.noise_level == "given":
            return self._sigma_tensor(sigma, pixels01.device).reshape(-1).expand(pixels01.shape[0])
        with torch.no_grad():
            return estimate_noise_std(pixels01).clamp(0.0, self.config.sigma_max)

    def denoise(self, pixels01: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """Denoise images at a given noise level.

        Args:
            pixels01: noisy images (N, C, H, W) in [0,1] pixel space, C = ``config.image_channels``, H and W
                divisible by ``config.denoiser_downscale``.
            sigma: the noise level, std in [0,1] pixel space: a float or a per-image (N,) tensor, >= 0
                (0 = clean: the denoiser is then the identity).

        Returns:
            Denoised images of the input's shape (N, C, H, W), device and dtype (not clamped); the input
            itself without a denoiser.

        Raises:
            ValueError: pixels that are not (N, C, H, W), with another channel count or a side not
                divisible by the downscale factor, or a negative or non-finite sigma.
        """
        _check_pixels(pixels01)
        if self.denoiser is None:
            return pixels01
        if pixels01.shape[1] != self.config.image_channels:
            raise ValueError(f"pixels01 has {pixels01.shape[1]} channels, the denoiser expects {self.config.image_channels}")
        param = next(self.denoiser.parameters())
        out = self.denoiser(pixels01.to(device=param.device, dtype=torch.float32), self._sigma_tensor(sigma, param.device))
        return out.to(device=pixels01.device, dtype=pixels01.dtype)

    def map_features(self, features: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """Map image features: z + M(z, sigma), per token (last dim).

        Args:
            features: image features (B, ..., feature_dim) (or one vector (feature_dim,)), before
                normalisation.
            sigma: the noise level, std in [0,1] pixel space: a float or a per-image (B,) tensor, >= 0.

        Returns:
            Features of the input's shape (B, ..., feature_dim), device and dtype; the input itself
            without a mapper.

        Raises:
            ValueError: not a tensor, a last dim other than ``config.feature_dim``, or a negative or
                non-finite sigma.
        """
        if not isinstance(features, torch.Tensor) or features.ndim < 1:
            raise ValueError("features must be a tensor whose last dim is the feature dim")
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"features have last dim {features.shape[-1]}, this booster was trained for feature_dim="
                f"{self.config.feature_dim} (encoder {self.config.encoder_id or 'unspecified'})"
            )
        if self.mapper is None:
            return features
        param = next(self.mapper.parameters())
        z = features.to(device=param.device)
        if z.ndim == 1:
            z = z.unsqueeze(0)
        out = self.mapper(z, self._sigma_tensor(sigma, param.device))
        return out.reshape(features.shape).to(device=features.device, dtype=features.dtype)

    def forward(self, pixels01: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor], sigma: SigmaLike) -> torch.Tensor:
        """The boosted features: denoise, encode, map, at the level ``noise_level`` gives.

        Args:
            pixels01: images (N, C, H, W) in [0,1] pixel space.
            encoder: the frozen encoder, mapping pixels (N, C, H, W) to features (N, ..., feature_dim).
            sigma: the smoothing noise std in [0,1] pixel space (a float or a per-image (N,) tensor).

        Returns:
            Features (N, ..., feature_dim), unnormalised (smoothing normalises them).

        Raises:
            ValueError: as ``noise_level``, ``denoise`` and ``map_features``.
        """
        level = self.noise_level(pixels01, sigma)
        return self.map_features(encoder(self.denoise(pixels01, level)), level)

    @staticmethod
    def _sigma_tensor(sigma: SigmaLike, device: torch.device) -> torch.Tensor:
        if isinstance(sigma, torch.Tensor):
            if not torch.isfinite(sigma).all() or (sigma < 0).any():
                raise ValueError("sigma must be finite and >= 0")
            return sigma.to(device=device, dtype=torch.float32)
        value = float(sigma)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        return torch.tensor(value, device=device, dtype=torch.float32)

    # ---- serialisation ---------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> Path:
        """Write the weights as gsb.safetensors and the config as gsb_config.json (never pickle).

        Args:
            save_directory: the folder (created if missing).

        Returns:
            The folder, as a Path.

        Raises:
            ValueError: ``save_directory`` exists and is not a folder.
        """
        from safetensors.torch import save_file

        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"save_directory {str(out)!r} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "gsb_format_version": str(FORMAT_VERSION)})
        payload = {"gsb_format_version": FORMAT_VERSION, **self.config.to_dict()}
        (out / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True))
        return out

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "GaussianSmoothnessBooster":
        """Load a booster saved by ``save_pretrained``, strictly (every weight must match).

        Args:
            directory: a folder holding gsb_config.json and gsb.safetensors.
            device: where to put the booster.

        Returns:
            The booster, on ``device``, in eval mode.

        Raises:
            ValueError: a missing file, a format version other than this fs_mllm's, an invalid config,
                damaged or non-floating-point weights, NaN/Inf weights, or weights that do not match the
                config's architecture; each message names the file.
        """
        folder = Path(directory)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(f"directory {str(folder)!r} must contain {CONFIG_NAME} and {WEIGHTS_NAME}")
        config_path = folder / CONFIG_NAME
        data = _read_json_object(config_path)
        version = data.pop("gsb_format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{config_path} has gsb_format_version {version!r}; this fs_mllm reads {FORMAT_VERSION}")
        try:
            booster = cls(GSBConfig.from_dict(data))
        except ValueError as error:
            raise ValueError(f"{config_path}: {error}") from None
        weights_path = folder / WEIGHTS_NAME
        state = _read_safetensors(weights_path)
        expected = booster.state_dict()
        for name, tensor in state.items():  # load_state_dict would cast silently, and NaN would only show at generate
            want = expected.get(name)
            if want is not None and want.is_floating_point() and not tensor.is_floating_point():  # fp16/bf16 upcast fine
                raise ValueError(f"{weights_path}: {name} is {tensor.dtype}, not a floating-point weight; the file was "
                                 "not written by save_pretrained, or was altered")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{weights_path}: {name} holds NaN or Inf (a diverged training run?); retrain or restore the file")
        try:
            booster.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{weights_path}: the weights do not match the architecture in {CONFIG_NAME}: {error}") from None
        return booster.to(device).eval()

    def num_parameters(self) -> int:
        """Number of weights (parameters of the denoiser and the mapper).

        Returns:
            The parameter count.
        """
        return sum(p.numel() for p in self.parameters())


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not UTF-8, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); re-save the booster") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg}: line {error.lineno}, column {error.colno}); "
                         "the file is damaged or truncated, re-save the booster") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of GSBConfig fields, got a JSON {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; ValueError naming the file when it is damaged or truncated."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                         "the file is damaged or truncated, re-save the booster") from None


def boosted_encoder(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    booster: Optional[GaussianSmoothnessBooster],
    sigma: float,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder the certificate is about: x -> map(encoder(denoise(x, s)), s), s = noise_level(x, sigma).

    Exactly the function ``patch_model(..., booster=...)`` smooths: pass the result to
    ``fs_mllm.certify_features`` or ``fs_mllm.smooth_features``. Compatibility (feature size,
    sigma range) is checked on the first call, when the feature size is known.

    Args:
        encoder: maps [0,1] pixels (N, C, H, W) to features (N, ..., D).
        booster: a ``GaussianSmoothnessBooster`` (or any object with the booster protocol), or None.
        sigma: the smoothing noise std, in [0,1] pixel space, in (0, 10].

    Returns:
        The boosted encoder, mapping pixels (N, C, H, W) to features (N, ..., D); ``encoder`` itself when
        ``booster`` is None.

    Raises:
        ValueError: sigma out of range, or a booster without ``check_compatible`` or without either
            stage; on the first call, a booster trained for another feature size or sigma range.
    """
    sigma = check_sigma(sigma)
    if booster is None:
        return encoder
    if not callable(getattr(booster, "check_compatible", None)):
        raise ValueError("booster must implement the booster protocol; it has no callable 'check_compatible'")
    stages = BoosterStages(booster, sigma)
    if stages.denoise is None and stages.map_features is None:
        raise ValueError("booster has neither denoise(pixels01, sigma) nor map_features(features, sigma)")
    checked: list = []

    def encode(pixels01: torch.Tensor) -> torch.Tensor:
        level = stages.level(pixels01)
        features = encoder(stages.before(pixels01, level))
        if not checked:
            booster.check_compatible(int(features.shape[-1]), sigma)
            checked.append(True)
        return stages.after(features, level)

    return encode

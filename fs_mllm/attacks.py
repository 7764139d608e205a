"""White-box PGD attacks on the full multimodal pipeline, adaptive to feature-space smoothing.

Attacks act on [0,1] pixels at the processor's resolution (DESIGN.md section 6). Every step goes
through the family adapter's differentiable normalisation (and Qwen2-VL patch flattening) into the
model's own image-feature function, so a patched model is attacked *through its smoothed path*.

Two threat models (DESIGN.md section 6), named by ``AttackConfig.protocol`` and never one for the other:

- ``adaptive`` (white-box against the defense): gradients through the smoothed path, as below.
- ``transfer`` (the paper's protocol: AttackVLM, M-Attack, FOA-Attack): the images are crafted once
  without the defense -- on the model's own undefended image path (the patch is lifted while
  crafting), or on named surrogate encoders (an ensemble when several are given) -- and are then
  replayed unchanged on every variant. Typical: ``feature_target`` at linf 16/255, hundreds of steps,
  M-Attack's random local crops (``crop_scale``).

Objectives (all written as a loss the attack minimises):

- ``feature``: cosine between the adversarial and the clean image features that feed the decoder
  (flattened per image, the certificate's global mode).
- ``feature_target``: minus the cosine between the adversarial image's features and a target image's
  (AttackVLM-style targeted feature matching; needs ``target_images``).
- ``untargeted``: minus the language-model loss of the clean answer/caption (so the answer is pushed away).
- ``targeted``: the language-model loss of ``target_text`` (e.g. "a photo of a dog").

Why the attack must be adaptive. A patched model averages unit features over Gaussian copies of the
image. Attacking the unpatched encoder and replaying the result (a transfer attack), or differentiating
through one fixed noise draw, measures the attacker's luck with one noise sample, not the smoothed
encoder F(x) = E f(x + e) the certificate speaks about, and so overstates robustness (Athalye et al.
2018, "Obfuscated gradients"). Here the gradient is the Monte-Carlo estimate of grad E_e[loss]
(expectation over transformation, EOT): ``eot_samples`` independent forwards of the smoothed path, each
with its own noise seed, fresh noise at every step. Their gradients are accumulated over chunks of
``eot_chunk_size`` forwards, so memory holds at most ``eot_chunk_size`` activation graphs, never
``eot_samples`` of them (the sum of chunk gradients equals the gradient of the mean loss exactly).
Each EOT forward itself averages the patch's ``n_samples`` noisy copies (what is deployed);
``smoothing_samples`` raises that count during the attack, which aims the gradient at the exact F
rather than at its n0-sample estimate (on tiny models this mattered more than more EOT samples).

The patched image-feature function is differentiable (``fs_mllm.patching`` runs no ``no_grad``), so the
attack reuses it; only the noise seed is changed per EOT forward, through patching's own
:func:`fs_mllm.patching.config_override` for the duration of one forward (:func:`noise_seed`).

Projections live in one place (:func:`project`): after every step delta is projected onto the l2 or
linf ball of radius eps and x + delta is clamped to [0, 1] (clamping only shrinks |delta| per pixel,
so the ball constraint still holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import adapters as _adapters  # noqa: F401  (registers every family)
from .adapters.base import FamilyAdapter, get_adapter, unwrap_model
from .arguments import check_float, check_int
from .config import ATTACK_ANSWER_TOKENS, ATTACK_EOT_SAMPLES, ATTACK_STEPS, DEFAULT_GENERATE_BATCH, check_bool, check_seed
from .normalization import resolve_mean_std
from .patching import config_override, get_fs_state, is_patched, replaced_feature_function, undefended
from .smoothing import check_images
from .surrogates import BUILT_IN_SURROGATES, M_ATTACK_SURROGATES, expand_surrogates, surrogate_encoder

NORMS = ("l2", "linf")
OBJECTIVES = ("feature", "feature_target", "untargeted", "targeted")
PROTOCOLS = ("adaptive", "transfer")
ENSEMBLE_WEIGHTINGS = ("mean", "gradient")
SURROGATES = BUILT_IN_SURROGATES  # "model": the undefended model's own image path; see fs_mllm.surrogates
# AttackConfig fields added after settings were first stored (results folders, checkpoints), which the
# settings classes carry under the same names; at these values they run the attack those runs ran
ADDED_FIELDS = {"crop_views": 1, "crop_full_view": False, "adaptive_examples": None, "ensemble_weighting": "mean"}


def without_added_defaults(settings: dict) -> dict:
    """A stored identity: ``settings`` less the ADDED_FIELDS at their old values, so a folder written before
    they existed (whose settings lack them) still matches, and any other value is a difference."""
    return {k: v for k, v in settings.items() if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}

__all__ = [
    "AttackConfig",
    "AttackResult",
    "PROTOCOLS",
    "M_ATTACK_SURROGATES",
    "SURROGATES",
    "StepRecord",
    "attack",
    "build_text_inputs",
    "eot_gradient",
    "feature_cosine",
    "generate_text",
    "image_features",
    "input_features",
    "make_objective",
    "noise_seed",
    "project",
    "surrogate_encoder",
    "undefended",
]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class AttackConfig:
    """One PGD attack, validated on construction (JSON-serialisable via ``to_dict``).

    Defaults (config.ATTACK_STEPS steps, config.ATTACK_EOT_SAMPLES EOT samples: 20 and 8) are the weakest adaptive
    attack worth believing.

    Attributes:
        norm: "l2" or "linf": the ball the perturbation stays in, in [0,1] pixel space.
        eps: its radius, in [0,1] pixel space (linf at most 1: 16/255, not 16).
        steps: PGD iterations.
        step_size: the move per step, in [0,1] pixel units (None = 2.5 * eps / steps, Madry et al.).
        random_start: start at a random point of the ball.
        objective: "feature" (push the features from the clean ones) | "feature_target" (pull them to
            ``target_images``' features) | "untargeted" (push the clean answer away) | "targeted" (make the
            model say ``target_text``).
        target_text: the text the "targeted" objective aims at (required there).
        protocol: "adaptive" (gradients through the defense) | "transfer" (crafted without it, then replayed;
            see the module doc).
        crop_scale: (lo, hi) area fraction of M-Attack's random local crop taken of the adversarial image
            at every forward and resized back (None = no crops).
        crop_views: transfer only: forwards averaged per crafting gradient, each its own crop; M-Attack takes 1.
        crop_full_view: transfer only: the first of those views sees the whole image, the view the model is
            finally judged on, so the crops add transferability without giving up the attack on that view.
        ensemble_weighting: how the members of a surrogate ensemble add up: "mean" averages their cosines
            (M-Attack's); "gradient" first scales each member's gradient to the members' mean norm, per
            image, so the member with the largest gradients cannot take the whole step (the loss reported
            is still the mean cosine). The same for one encoder.
        eot_samples: noisy forwards averaged per gradient on a patched model (1 on an unpatched,
            deterministic one).
        eot_chunk_size: forwards per backward, a memory knob (None = all).
        smoothing_samples: noisy copies inside each smoothed forward during the attack (None = the patch's
            n_samples, i.e. attack what is deployed; larger = a gradient of the exact smoothed encoder F).
        seed: seeds the random start and the per-step noise and crops.
        record_steps: keep a StepRecord per step in the result.

    Raises:
        ValueError: an unknown norm, objective or protocol; a non-positive eps, or a linf eps above 1;
            an invalid crop_scale; crop_views > 1 or crop_full_view outside the transfer protocol or
            without crops (crop_full_view also needs crop_views >= 2); non-positive counts or step size;
            a seed out of range; "targeted" without a non-empty target_text; an unknown ensemble_weighting,
            or "gradient" with an objective that has no ensemble (the answer objectives).
    """

    norm: str = "l2"
    eps: float = 0.5
    steps: int = ATTACK_STEPS
    step_size: Optional[float] = None
    random_start: bool = True
    objective: str = "feature"
    target_text: Optional[str] = None
    protocol: str = "adaptive"
    crop_scale: Optional[tuple[float, float]] = None
    crop_views: int = 1
    crop_full_view: bool = False
    ensemble_weighting: str = "mean"
    eot_samples: int = ATTACK_EOT_SAMPLES
    eot_chunk_size: Optional[int] = None
    smoothing_samples: Optional[int] = None
    seed: int = 0
    record_steps: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if self.ensemble_weighting not in ENSEMBLE_WEIGHTINGS:
            raise ValueError(f"ensemble_weighting must be one of {list(ENSEMBLE_WEIGHTINGS)}, got {self.ensemble_weighting!r}")
        if self.ensemble_weighting != "mean" and self.objective not in ("feature", "feature_target"):
            raise ValueError(f"ensemble_weighting={self.ensemble_weighting!r} weighs surrogate encoders, which only the "
                             f"feature objectives use; drop it for objective={self.objective!r}")
        self.eps = check_float(self.eps, "eps")
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"eps={self.eps:g} is outside the linf range (0, 1] of [0,1] pixels; "
                             f"write budgets in pixel units, e.g. 16/255 = {16 / 255:.4f}")
        if self.crop_scale is not None:
            try:
                low, high = (float(v) for v in self.crop_scale)
            except (TypeError, ValueError):
                raise ValueError(f"crop_scale must be None or (lo, hi) area fractions, got {self.crop_scale!r}") from None
            if not 0 < low <= high <= 1:
                raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale!r}")
            self.crop_scale = (low, high)
        self.steps = check_int(self.steps, "steps")
        self.step_size = 2.5 * self.eps / self.steps if self.step_size is None else check_float(self.step_size, "step_size")
        self.crop_views = check_int(self.crop_views, "crop_views")
        self.crop_full_view = check_bool(self.crop_full_view, "crop_full_view")
        if self.crop_views > 1 or self.crop_full_view:  # they shape the crafting gradient of transfer images only
            if self.protocol != "transfer":
                raise ValueError("crop_views > 1 and crop_full_view (--crop-views, --crop-full-view) are for "
                                 "protocol='transfer' (crafting on the undefended model); an adaptive attack's forwards "
                                 "are its eot_samples, each with its own crop. Use protocol='transfer' or drop them")
            if self.crop_scale is None:
                raise ValueError("crop_views > 1 and crop_full_view (--crop-views, --crop-full-view) need crop_scale "
                                 "(--crop-scale 0.5,1), the crops they are about; set it, or drop them")
            if self.crop_full_view and self.crop_views < 2:
                raise ValueError("crop_full_view with crop_views=1 leaves no crop (the first view is the whole image); "
                                 "set crop_views >= 2 (--crop-views 2), or drop crop_full_view")
        self.eot_samples = check_int(self.eot_samples, "eot_samples")
        if self.eot_chunk_size is not None:
            self.eot_chunk_size = check_int(self.eot_chunk_size, "eot_chunk_size")
        if self.smoothing_samples is not None:
            self.smoothing_samples = check_int(self.smoothing_samples, "smoothing_samples", minimum=1)
        self.seed = check_seed(self.seed)
        if self.objective == "targeted":
            if not isinstance(self.target_text, str) or not self.target_text.strip():
                raise ValueError(
                    f"target_text must be a non-empty string for objective='targeted' (what the model should say), "
                    f"got {self.target_text!r}"
                )
        elif self.target_text is not None and not isinstance(self.target_text, str):
            raise ValueError(f"target_text must be a string or None, got {type(self.target_text).__name__}")

    def to_dict(self) -> dict:
        """The config as JSON-serialisable data.

        Returns:
            {field name: value} (``crop_scale`` a tuple or None).
        """
        return dataclasses.asdict(self)


@dataclass
class StepRecord:
    """What one PGD step did: mean loss before the step, per-image ||delta|| after projection, pixel range."""

    step: int
    loss: float
    delta_norm: list[float]
    pixel_min: float
    pixel_max: float


@dataclass
class AttackResult:
    """What ``attack`` returns: the adversarial images and how far they moved the features.

    ``fcs`` is measured on the features the decoder receives from ``model`` as given (smoothed, with
    the patch's own seed, when it is patched), so it is what the deployed pipeline sees.

    Attributes:
        adv_images: the adversarial images, float32 [0,1] pixels of the input's shape (B, ..., 3, H, W).
        clean_images: the input images, float32, same shape.
        fcs: per-image feature cosine similarity, clean vs adversarial (B floats).
        delta_norm: per-image size of the perturbation in the attack's norm, in [0,1] pixel units (B floats).
        final_loss: the objective's mean over the batch at the adversarial images (the loss minimised).
        config: the ``AttackConfig`` that ran.
        steps: one StepRecord per step with ``record_steps``, else empty.
    """

    adv_images: torch.Tensor
    clean_images: torch.Tensor
    fcs: list[float]
    delta_norm: list[float]
    final_loss: float
    config: AttackConfig
    steps: list[StepRecord] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the one place for projections
# ---------------------------------------------------------------------------------------------

def _per_image_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def _expand(per_image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_image.reshape((-1,) + (1,) * (like.ndim - 1))


def project(delta: torch.Tensor, images: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project delta onto the ``norm`` ball of radius eps, then make images + delta lie in [0, 1].

    The clamp shrinks |delta| pixel by pixel, so after it the ball constraint still holds.
    """
    if norm == "l2":
        norms = _per_image_norm(delta, "l2")
        delta = delta * _expand(torch.clamp(eps / norms.clamp_min(1e-12), max=1.0), delta)
    else:
        delta = delta.clamp(-eps, eps)
    return (images + delta).clamp(0.0, 1.0) - images


def _random_start(images: torch.Tensor, config: AttackConfig, generator: torch.Generator) -> torch.Tensor:
    if not config.random_start:
        return torch.zeros_like(images)
    if config.norm == "linf":
        delta = (torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1) * config.eps
    else:
        direction = torch.randn(images.shape, generator=generator, device=images.device)
        direction = direction / _expand(direction.flatten(1).norm(dim=1).clamp_min(1e-12), direction)
        radius = torch.rand(images.shape[0], generator=generator, device=images.device) * config.eps
        delta = direction * _expand(radius, direction)
    return project(delta, images, config.norm, config.eps)


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-descent direction of unit size in the attack norm (the caller subtracts it)."""
    if norm == "linf":
        return grad.sign()
    return grad / _expand(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)


# ---------------------------------------------------------------------------------------------
# the model's (possibly smoothed) feature path and text path
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def noise_seed(model: nn.Module, seed: Optional[int], n_samples: Optional[int] = None) -> Iterator[None]:
    """Within the block, a patched model draws its smoothing noise from ``seed`` (and, when given,
    averages ``n_samples`` noisy copies per forward); the patch's own config is restored afterwards.

    Each EOT forward needs fresh, independent noise: :func:`fs_mllm.patching.config_override`, which
    patching owns. No-op for an unpatched model.
    """
    if (seed is None and n_samples is None) or not is_patched(model):
        yield
        return
    changes = {"seed": seed, "n_samples": n_samples}
    with config_override(model, **{k: int(v) for k, v in changes.items() if v is not None}):
        yield


def _local_crops(images: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """M-Attack's local view: per image a random crop of area fraction in ``scale`` (aspect kept square-ish),
    resized back to the full resolution (bilinear, differentiable)."""
    height, width = images.shape[-2:]
    views = []
    for image in images.reshape((-1,) + tuple(images.shape[-3:])):
        area = float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        side_h = max(1, min(height, round(height * area ** 0.5)))
        side_w = max(1, min(width, round(width * area ** 0.5)))
        top = int(torch.randint(0, height - side_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side_w + 1, (1,), generator=generator))
        crop = image[None, :, top:top + side_h, left:left + side_w]
        views.append(torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False))
    return torch.cat(views).reshape(images.shape)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
            return parameter.device, dtype
    return torch.device("cpu"), torch.float32


def _image_inputs(model: nn.Module, adapter: FamilyAdapter, images01: torch.Tensor, mean: torch.Tensor,
                  std: torch.Tensor, image_kwargs: Mapping[str, Any]) -> dict:
    device, dtype = _model_device_dtype(model)
    inputs = adapter.pixels_to_model_inputs(unwrap_model(model), images01.to(device).float(), mean, std, **image_kwargs)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def image_features(model: nn.Module, images01: torch.Tensor, image_mean: Any = None, image_std: Any = None,
                   processor: Any = None, **image_kwargs: Any) -> torch.Tensor:
    """Features (B, T, D) that feed the decoder for [0,1] images, differentiably, through the model's own
    image-feature function (the smoothed one when the model is patched)."""
    adapter = get_adapter(model)
    mean, std = _resolve_mean_std(model, adapter, processor, image_mean, image_std)
    return _features(model, adapter, _image_inputs(model, adapter, images01, mean, std, image_kwargs), images01.shape[0])


def input_features(model: nn.Module, inputs: Mapping[str, Any], count: int = 1) -> torch.Tensor:
    """Features (B, T, D) for model inputs already built (e.g. a processor's output), through the same call
    as :func:`image_features`; the eval runner's clean features use the processor's pixels as they are,
    without a round trip through [0,1]."""
    return _features(model, get_adapter(model), inputs, count)


def _features(model: nn.Module, adapter: FamilyAdapter, inputs: Mapping[str, Any], count: int) -> torch.Tensor:
    owner = adapter.feature_owner(unwrap_model(model))
    function = getattr(owner, adapter.feature_function)
    names = set(inspect.signature(function).parameters)
    kwargs = {k: v for k, v in inputs.items() if k in names}
    output = function(**kwargs, return_dict=True)
    return adapter.call_features(output, count, kwargs)


def _resolve_mean_std(model: nn.Module, adapter: FamilyAdapter, processor: Any, image_mean: Any, image_std: Any):
    """A patched model's own mean/std win (the noise scale was set with them); else processor/explicit/saved."""
    if image_mean is None and image_std is None and is_patched(model):
        state = get_fs_state(model)
        return state.image_mean, state.image_std
    return resolve_mean_std(model, adapter, processor, image_mean, image_std)


def _tokenizer_of(processor_or_tokenizer: Any) -> Any:
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    if tokenizer is None or not callable(tokenizer):
        raise ValueError("processor_or_tokenizer must be a transformers processor or tokenizer (needed for text objectives)")
    return tokenizer


def _to_pil(image01: torch.Tensor):
    from PIL import Image

    array = (image01.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def _prompt_rows(processor: Any, images01: torch.Tensor, prompts: Union[Sequence[str], Mapping[str, Any]]) -> list[dict]:
    """Per-example dict of 1-D token tensors (input_ids, attention_mask, ...) with the image tokens in place."""
    batch = images01.shape[0]
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            raise ValueError("prompts given as a dict must hold input_ids (with the image tokens in place)")
        ids = torch.as_tensor(prompts["input_ids"])
        if ids.ndim != 2 or ids.shape[0] != batch:
            raise ValueError(f"prompts['input_ids'] must be (B={batch}, L), got {tuple(ids.shape)}")
        mask = torch.as_tensor(prompts.get("attention_mask", torch.ones_like(ids))).bool()
        rows = []
        for i in range(batch):
            rows.append({k: torch.as_tensor(prompts[k])[i][mask[i]] for k in _TOKEN_KEYS if k in prompts})
            rows[-1].setdefault("attention_mask", torch.ones_like(rows[-1]["input_ids"]))
        return rows
    if isinstance(prompts, str) or len(prompts) != batch:
        raise ValueError(f"prompts must be a list of {batch} strings (one per image) or a dict of token inputs")
    if getattr(processor, "image_processor", None) is None:
        raise ValueError("string prompts need a multimodal processor (with image_processor) to place the image tokens; "
                         "pass the model's processor or a dict of token inputs")
    rows = []
    for image, prompt in zip(images01, prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
        encoded = processor(text=[prompt], images=[_to_pil(image.reshape((-1,) + tuple(image.shape[-3:]))[0])], return_tensors="pt")
        rows.append({k: torch.as_tensor(encoded[k])[0] for k in _TOKEN_KEYS if k in encoded})
    return rows


def build_text_inputs(processor_or_tokenizer: Any, images01: torch.Tensor, prompts: Union[Sequence[str], Mapping[str, Any]],
                      continuations: Optional[Sequence[str]] = None) -> dict:
    """Token inputs for prompt (+ continuation) per image, right-padded, with ``labels`` on the continuation.

    ``prompts`` are strings (the processor places the image tokens) or a dict of token inputs that
    already hold them. A continuation that tokenises to nothing is an error (its loss is undefined).
    """
    rows = _prompt_rows(processor_or_tokenizer, images01, prompts)
    tokenizer = _tokenizer_of(processor_or_tokenizer) if continuations is not None else None
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = 0 if pad is None else int(pad)
    labels = []
    for i, row in enumerate(rows):
        length = row["input_ids"].shape[0]
        label = torch.full((length,), -100, dtype=torch.long)
        if continuations is not None:
            ids = tokenizer(continuations[i], add_special_tokens=False)["input_ids"]
            ids = torch.as_tensor(ids, dtype=torch.long).flatten()
            if ids.numel() == 0:
                raise ValueError(f"text {continuations[i]!r} tokenises to nothing; its loss (the attack objective) is undefined")
            row["input_ids"] = torch.cat([row["input_ids"].long(), ids])
            row["attention_mask"] = torch.cat([row["attention_mask"].long(), torch.ones_like(ids)])
            for key in ("token_type_ids", "mm_token_type_ids"):
                if key in row:
                    row[key] = torch.cat([row[key].long(), torch.zeros_like(ids)])
            label = torch.cat([label, ids])
        labels.append(label)
    width = max(r["input_ids"].shape[0] for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        fill = pad if key == "input_ids" else 0
        out[key] = torch.stack([torch.nn.functional.pad(r[key].long(), (0, width - r[key].shape[0]), value=fill) for r in rows])
    out["labels"] = torch.stack([torch.nn.functional.pad(l, (0, width - l.shape[0]), value=-100) for l in labels])
    return out


def _sequence_loss(model: nn.Module, text_inputs: Mapping[str, torch.Tensor], image_inputs: Mapping[str, Any]) -> torch.Tensor:
    """Per-example mean cross-entropy of the labelled (continuation) tokens, (B,)."""
    device, _ = _model_device_dtype(model)
    inputs = {k: v.to(device) for k, v in text_inputs.items() if k != "labels"}
    forward_names = set(inspect.signature(unwrap_model(model).forward).parameters)
    extra = {k: v for k, v in image_inputs.items() if k in forward_names}
    logits = model(**inputs, **extra).logits.float()
    labels = text_inputs["labels"].to(device)
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(shifted_labels.shape)
    counted = (shifted_labels != -100).float()
    return (token_loss * counted).sum(1) / counted.sum(1).clamp_min(1.0)


@torch.no_grad()
def generate_text(model: nn.Module, processor_or_tokenizer: Any, images01: torch.Tensor,
                  prompts: Union[Sequence[str], Mapping[str, Any]], max_new_tokens: int = ATTACK_ANSWER_TOKENS,
                  image_mean: Any = None, image_std: Any = None, batch_size: int = DEFAULT_GENERATE_BATCH,
                  features: Optional[list] = None, **image_kwargs: Any) -> list[str]:
    """Greedy answers for [0,1] images, up to ``batch_size`` prompts of the same token length per ``generate``.

    Rows are grouped by length so no padding enters a batch (answers do not depend on a padding side),
    and each answer is cut after its first end-of-sequence token, as a generate of its own would stop.
    Batching shares the decoder's weight reads across the rows of a decoding step. With ``features`` (a
    list), the image features (B, T, D) the decoder was given, as :func:`image_features` returns them, are
    appended to it: taken from the model's own call inside ``generate`` (no second pass through a smoothed
    path), or computed by :func:`image_features` where that call could not be read back.
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    adapter = get_adapter(model)
    mean, std = _resolve_mean_std(model, adapter, processor_or_tokenizer, image_mean, image_std)
    text = build_text_inputs(processor_or_tokenizer, images01, prompts)
    tokenizer = _tokenizer_of(processor_or_tokenizer)
    device, _ = _model_device_dtype(model)
    forward_names = set(inspect.signature(unwrap_model(model).forward).parameters)
    stop_ids = _stop_token_ids(model)
    lengths = text["attention_mask"].sum(1).tolist()
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(int(length), []).append(i)
    outputs: list[Optional[str]] = [None] * images01.shape[0]
    recorded: list[Optional[torch.Tensor]] = [None] * images01.shape[0]
    for length, members in groups.items():
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            index = torch.tensor(rows)
            # right padding: a row's first `length` tokens are all of it (every row of the group has that length)
            batch = {k: v[index, :length].to(device) for k, v in text.items() if k != "labels"}
            row_kwargs = {k: torch.as_tensor(v)[index] for k, v in image_kwargs.items() if v is not None}
            images = _image_inputs(model, adapter, images01[index], mean, std, row_kwargs)
            images = {k: v for k, v in images.items() if k in forward_names}
            with _recording_features(model, adapter, len(rows), features is not None) as calls:
                generated = model.generate(**batch, **images, max_new_tokens=max_new_tokens, do_sample=False)
            for j, i in enumerate(rows):
                outputs[i] = tokenizer.decode(_until_stop(generated[j, length:].tolist(), stop_ids), skip_special_tokens=True)
            if features is not None:
                taken = calls[0] if len(calls) == 1 and calls[0] is not None else _features_of_rows(
                    model, images01, index, image_mean, image_std, processor_or_tokenizer, row_kwargs)
                for j, i in enumerate(rows):
                    recorded[i] = taken[j].detach()
    if features is not None:
        shapes = {tuple(f.shape) for f in recorded}
        if len(shapes) > 1:
            raise ValueError(f"features=: the images give features of different shapes {sorted(shapes)}; ask for them "
                             "per image size (one generate_text call per size)")
        features.append(torch.stack(recorded))
    return outputs  # type: ignore[return-value]


def _features_of_rows(model: nn.Module, images01: torch.Tensor, index: torch.Tensor, image_mean: Any, image_std: Any,
                      processor: Any, row_kwargs: dict) -> list[torch.Tensor]:
    """image_features of ``images01[index]``: in one call, or one image at a time where the rows cannot be stacked
    (images of one batch whose features differ in length)."""
    try:
        return list(image_features(model, images01[index], image_mean, image_std, processor, **row_kwargs))
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError):
        return [image_features(model, images01[i:i + 1], image_mean, image_std, processor,
                               **{k: v[j:j + 1] for k, v in row_kwargs.items()})[0]
                for j, i in enumerate(index.tolist())]


def _stop_token_ids(model: nn.Module) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """A row's new tokens up to and including its first stop token (later ones are a batch's padding)."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:position + 1]
    return tokens


@contextlib.contextmanager
def _recording_features(model: nn.Module, adapter: FamilyAdapter, count: int, enabled: bool) -> Iterator[list]:
    """Within the block, the decoder-facing features of each call of the model's image-feature function
    (as :func:`image_features` returns them) are appended to the yielded list, or None for a call whose
    features could not be read as ``count`` rows (the caller then computes them itself); the call's output
    reaches ``generate`` untouched either way."""
    calls: list[Optional[torch.Tensor]] = []
    if not enabled:
        yield calls
        return

    def make(function: Callable) -> Callable:
        names = list(inspect.signature(function).parameters)

        @functools.wraps(function)
        def recording(*args: Any, **kwargs: Any) -> Any:
            output = function(*args, **kwargs)
            try:
                calls.append(adapter.call_features(output, count, {**dict(zip(names, args)), **kwargs}))
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError):  # rows that do not stack (images giving different token counts)
                calls.append(None)
            return output

        return recording

    with replaced_feature_function(model, adapter, make):
        yield calls


# ---------------------------------------------------------------------------------------------
# objective, EOT gradient, PGD loop
# ---------------------------------------------------------------------------------------------

Objective = Callable[[torch.Tensor], torch.Tensor]  # adversarial [0,1] images -> per-image loss (B,)


def _feature_encoders(model: nn.Module, adapter: FamilyAdapter, mean: torch.Tensor, std: torch.Tensor,
                      image_kwargs: Mapping[str, Any], surrogates: Optional[Sequence[Any]]) -> list[Callable]:
    """[0,1] images -> features, one callable per surrogate; None means the model's own image path."""
    def own_path(images: torch.Tensor) -> torch.Tensor:
        return _features(model, adapter, _image_inputs(model, adapter, images, mean, std, image_kwargs), images.shape[0])

    if not surrogates:
        return [own_path]
    encoders: list[Callable] = []
    for surrogate in expand_surrogates(surrogates):
        if isinstance(surrogate, str):
            encoders.append(own_path if surrogate == "model" else surrogate_encoder(surrogate).to(_model_device_dtype(model)[0]))
        elif callable(surrogate):
            encoders.append(surrogate)
        else:
            raise ValueError(f"surrogates: each must be a name ({list(SURROGATES)}, 'm-attack', a Hub id or a folder) "
                             f"or an encoder module, got {surrogate!r}")
    return encoders


def feature_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FCS per image, (B,): cosine of the flattened features (the certificate's global mode)."""
    return torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


def make_objective(model: nn.Module, processor_or_tokenizer: Any, images01: torch.Tensor,
                   prompts: Union[Sequence[str], Mapping[str, Any], None], config: AttackConfig,
                   answers: Optional[Sequence[str]] = None, image_mean: Any = None, image_std: Any = None,
                   target_images: Optional[torch.Tensor] = None, surrogates: Optional[Sequence[Any]] = None,
                   **image_kwargs: Any) -> tuple[Objective, torch.Tensor]:
    """The per-image loss the attack minimises, and the clean features (B, T, D) it starts from.

    feature: cos(flat F(x'), flat F(x)); feature_target: -cos(flat F(x'), flat F(target));
    untargeted: -CE(answer); targeted: CE(target_text). The feature objectives average over the
    ``surrogates`` (an ensemble) when given. For ``untargeted`` without ``answers`` the model's clean
    greedy answer is the one pushed away.
    """
    adapter = get_adapter(model)
    mean, std = _resolve_mean_std(model, adapter, processor_or_tokenizer, image_mean, image_std)
    batch = images01.shape[0]
    with torch.no_grad(), noise_seed(model, None, config.smoothing_samples):
        clean = _features(model, adapter, _image_inputs(model, adapter, images01, mean, std, image_kwargs), batch).float()

    if config.objective in ("feature", "feature_target"):
        encoders = _feature_encoders(model, adapter, mean, std, image_kwargs, surrogates)
        anchor_images = images01 if config.objective == "feature" else target_images
        sign = 1.0 if config.objective == "feature" else -1.0
        with torch.no_grad(), noise_seed(model, None, config.smoothing_samples):
            anchors = [encode(anchor_images).float().flatten(1) for encode in encoders]

        def feature_loss(adv: torch.Tensor) -> torch.Tensor:
            losses = [sign * feature_cosine(encode(adv), anchor) for encode, anchor in zip(encoders, anchors)]
            if config.ensemble_weighting == "gradient" and len(losses) > 1 and adv.requires_grad and torch.is_grad_enabled():
                losses = _balanced_by_gradient(losses, adv)
            return sum(losses) / len(losses)

        return feature_loss, clean

    if surrogates:
        raise ValueError(f"surrogates work with the feature objectives only, not objective={config.objective!r}")
    if prompts is None:
        raise ValueError(f"objective={config.objective!r} needs prompts (the question or caption instruction)")
    if config.objective == "targeted":
        ids = _tokenizer_of(processor_or_tokenizer)(config.target_text, add_special_tokens=False)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"target_text {config.target_text!r} tokenises to nothing with this tokenizer; "
                             "the targeted loss is undefined, pick a text the tokenizer can encode")
        continuations = [config.target_text] * batch
        sign = 1.0
    else:
        if answers is None:
            answers = generate_text(model, processor_or_tokenizer, images01, prompts, image_mean=mean, image_std=std, **image_kwargs)
        if isinstance(answers, str) or len(answers) != batch:
            raise ValueError(f"answers must be a list of {batch} strings (the clean answer per image)")
        continuations = list(answers)
        sign = -1.0
    text = build_text_inputs(processor_or_tokenizer, images01, prompts, continuations)

    def text_loss(adv: torch.Tensor) -> torch.Tensor:
        return sign * _sequence_loss(model, text, _image_inputs(model, adapter, adv, mean, std, image_kwargs))

    return text_loss, clean


def _balanced_by_gradient(losses: list[torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
    """Each member's per-image loss (B,), its gradient w.r.t. ``images`` rescaled to the members' mean norm
    for that image, its value unchanged: an ensemble whose direction no single encoder dictates. Costs one
    extra backward per member."""
    norms = [torch.autograd.grad(loss.sum(), images, retain_graph=True)[0].flatten(1).norm(dim=1) for loss in losses]
    mean_norm = torch.stack(norms).mean(0)
    return [loss.detach() + (loss - loss.detach()) * (mean_norm / norm.clamp_min(1e-12)).detach()
            for loss, norm in zip(losses, norms)]


def _step_seeds(config: AttackConfig, step: int, count: int) -> list[int]:
    """One independent noise (and crop) seed per forward, fresh at every step."""
    state = np.random.SeedSequence([config.seed, step]).generate_state(count, dtype=np.uint32)
    return [int(s) for s in state]


def eot_gradient(model: nn.Module, objective: Objective, adv_images: torch.Tensor, config: AttackConfig,
                 step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over EOT samples per image (B,), its gradient w.r.t. the images), chunk by chunk.

    A patched model runs ``eot_samples`` forwards, each with its own noise seed; a backward runs after
    every ``eot_chunk_size`` forwards and gradients accumulate, so at most that many graphs are alive.
    An unpatched model is deterministic, so one forward is the exact gradient, or ``crop_views`` forwards
    with crops. With ``crop_scale`` each forward sees its own random local crop (seeded like its noise),
    except the first with ``crop_full_view``, which sees the whole image.
    """
    samples = config.eot_samples if is_patched(model) else config.crop_views
    seeds = _step_seeds(config, step, samples)
    chunk = min(config.eot_chunk_size or samples, samples)
    grad = torch.zeros_like(adv_images, dtype=torch.float32)
    loss_sum = torch.zeros(adv_images.shape[0], dtype=torch.float32, device=adv_images.device)
    for start in range(0, samples, chunk):
        leaf = adv_images.detach().float().clone().requires_grad_(True)
        total = None
        for index, seed in enumerate(seeds[start:start + chunk], start):
            view = leaf
            if config.crop_scale is not None and not (config.crop_full_view and index == 0):
                view = _local_crops(leaf, config.crop_scale, torch.Generator().manual_seed(seed))
            with noise_seed(model, seed, config.smoothing_samples):
                loss = objective(view).float()
            loss_sum += loss.detach().to(loss_sum.device)
            total = loss.sum() / samples if total is None else total + loss.sum() / samples
        (gradient,) = torch.autograd.grad(total, leaf)
        grad += gradient
    return loss_sum / samples, grad


def _check_budget(images01: torch.Tensor, config: AttackConfig) -> None:
    """An l2 budget past the largest possible distance in [0,1] pixels is a unit mistake, not an attack."""
    largest = math.sqrt(images01[0].numel())
    if config.norm == "l2" and config.eps > largest:
        raise ValueError(f"eps={config.eps:g} is outside the l2 range (0, {largest:.1f}] of these [0,1] images "
                         f"(the distance between an all-black and an all-white image); budgets are in [0,1] pixel units")


def _check_targets(images01: torch.Tensor, target_images: Optional[torch.Tensor], config: AttackConfig) -> Optional[torch.Tensor]:
    if config.objective != "feature_target":
        if target_images is not None:
            raise ValueError(f"target_images is only used by objective='feature_target', not {config.objective!r}")
        return None
    if target_images is None:
        raise ValueError("objective='feature_target' needs target_images: [0,1] images whose features the attack pulls towards")
    check_images(target_images, "target_images")
    target_images = target_images.detach().float().to(images01.device)
    if target_images.shape[0] == 1 and images01.shape[0] > 1:
        target_images = target_images.expand_as(images01)
    if target_images.shape != images01.shape:
        raise ValueError(f"target_images must have the images' shape {tuple(images01.shape)} (or one image of shape "
                         f"{tuple(images01.shape[1:])}), got {tuple(target_images.shape)}; resize the target to the processor's resolution")
    return target_images


def attack(model: nn.Module, processor_or_tokenizer: Any, images01: torch.Tensor,
           prompts: Union[Sequence[str], Mapping[str, Any], None], config: AttackConfig,
           answers: Optional[Sequence[str]] = None, image_mean: Any = None, image_std: Any = None,
           progress: Optional[Callable[[int, float], None]] = None, target_images: Optional[torch.Tensor] = None,
           surrogates: Optional[Sequence[Any]] = None, **image_kwargs: Any) -> AttackResult:
    """PGD on [0,1] images at processor resolution against ``model`` (patched or not).

    Adaptive: gradients are EOT averages through a patched model's smoothed path. Transfer: crafted
    without the patch (or on surrogates), so the images can be replayed on every variant. Either way the
    returned FCS is measured on ``model`` as given (the deployed pipeline).

    Args:
        model: a transformers multimodal model of a supported family, patched or not.
        processor_or_tokenizer: the model's processor (mean/std, and for the text objectives the
            tokenizer and the placing of image tokens), or a tokenizer with dict ``prompts``; may be None
            for the feature objectives when mean/std come from the patch or ``image_mean``/``image_std``.
        images01: float [0,1] pixels (B, ..., 3, H, W) at the processor's resolution.
        prompts: one string per image (the processor places the image tokens), a dict of token inputs
            (``input_ids`` (B, L) with the image tokens in place), or None for the feature objectives.
        config: the ``AttackConfig``.
        answers: "untargeted": the clean answer per image (B strings); None = the model's own greedy answer.
        image_mean: per-channel mean (3 floats), with ``image_std`` (default: the patch's, else the processor's).
        image_std: per-channel std (3 positive floats), with ``image_mean``.
        progress: called as ``progress(step, mean loss)`` after every step.
        target_images: "feature_target": [0,1] images of ``images01``'s shape, or one image (1, ...) for all.
        surrogates: transfer only: names (``fs_mllm.surrogates``: "model", the undefended model's own path;
            "dinov2"; "dinov2-cls112"; "m-attack", M-Attack's CLIP ensemble; a transformers encoder's Hub id
            or folder) or encoder modules mapping [0,1] images to features (B, T, D); several = an ensemble
            (default: the model's own undefended path).
        **image_kwargs: per-image family kwargs (e.g. ``image_sizes``).

    Returns:
        The ``AttackResult``.

    Raises:
        ValueError: ``config`` is not an AttackConfig; images that are not finite float [0,1] pixels
            (B, ..., 3, H, W); an l2 eps beyond the images' diameter; target_images missing for
            "feature_target", given for another objective, or of another shape; surrogates outside the
            transfer protocol, with a text objective, or unknown; a text objective without prompts, a
            tokenizer or one answer per image, or a target_text that tokenises to nothing; a model of an
            unsupported family; bad mean/std.
    """
    if not isinstance(config, AttackConfig):
        raise ValueError(f"config must be an fs_mllm.attacks.AttackConfig, got {type(config).__name__}")
    check_images(images01, "images01")
    if images01.ndim < 4 or images01.shape[-3] != 3:
        raise ValueError(f"images01 must be (B, ..., 3, H, W) [0,1] pixels, got shape {tuple(images01.shape)}")
    _check_budget(images01, config)
    target_images = _check_targets(images01, target_images, config)
    if surrogates is not None and config.protocol != "transfer":
        raise ValueError("surrogates are for protocol='transfer' (an adaptive attack goes through the defended model itself)")
    adapter = get_adapter(model)
    mean, std = _resolve_mean_std(model, adapter, processor_or_tokenizer, image_mean, image_std)
    clean_images = images01.detach().float()
    generator = torch.Generator(device=clean_images.device).manual_seed(config.seed)
    delta = _random_start(clean_images, config, generator)
    records: list[StepRecord] = []
    loss = torch.zeros(clean_images.shape[0])
    was_training = model.training
    model.eval()
    crafting = undefended(model) if config.protocol == "transfer" else contextlib.nullcontext()
    try:
        with crafting:
            objective, clean_features = make_objective(model, processor_or_tokenizer, clean_images, prompts, config, answers,
                                                       mean, std, target_images, surrogates, **image_kwargs)
            for step in range(config.steps):
                loss, grad = eot_gradient(model, objective, clean_images + delta, config, step)
                delta = project(delta - config.step_size * _ascent_direction(grad, config.norm), clean_images, config.norm, config.eps)
                if config.record_steps:
                    adv = clean_images + delta
                    records.append(StepRecord(step, float(loss.mean()), _per_image_norm(delta, config.norm).tolist(),
                                              float(adv.min()), float(adv.max())))
                if progress is not None:
                    progress(step, float(loss.mean()))
            adv_images = (clean_images + delta).detach()
            with torch.no_grad():
                final_loss = float(objective(adv_images).mean())
        with torch.no_grad():  # FCS as deployed: the model's own path and seed for both images
            count = adv_images.shape[0]
            adv_features = _features(model, adapter, _image_inputs(model, adapter, adv_images, mean, std, image_kwargs), count)
            if config.protocol == "transfer" or (config.smoothing_samples is not None and is_patched(model)):
                clean_features = _features(model, adapter, _image_inputs(model, adapter, clean_images, mean, std, image_kwargs), count)
    finally:
        model.train(was_training)
    fcs = feature_cosine(adv_features, clean_features)
    return AttackResult(adv_images, clean_images, fcs.cpu().tolist(), _per_image_norm(delta, config.norm).cpu().tolist(),
                        final_loss, config, records)

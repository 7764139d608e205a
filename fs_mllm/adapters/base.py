"""Family adapters: everything fs_mllm knows about one model family, in one place.

Every supported family is described by a :class:`FamilyAdapter` subclass registered under the
``config.model_type`` values it covers. The adapter answers four questions:

1. Where is the image-feature function? (``feature_owner(model)``: the module whose
   ``get_image_features`` ``generate()`` calls, i.e. ``model.base_model`` in transformers 5.x.)
2. What does one image look like in the model's input layout? The shared *image layout* is the
   normalised pixel tensor with channels on axis -3: ``(3, H, W)`` for LLaVA-1.5/PaliGemma/Gemma3,
   ``(crops, 3, H, W)`` for LLaVA-NeXT, ``(3, H, W)`` un-flattened from the patch rows for Qwen2-VL.
   ``images_from_inputs`` goes from ``pixel_values`` (+ family kwargs) to per-image tensors in that
   layout, ``inputs_from_images`` goes back (differentiably).
3. Per-channel noise scale: noise of std sigma in [0,1] pixel space is ``sigma / std_c`` in the
   normalised space, shaped ``(3, 1, 1)`` so it broadcasts on the image layout of every family.
4. Default processor mean/std, used only when neither the caller nor the saved processor config
   gives them.
5. Which output fields feed the decoder (``feature_fields``; several are smoothed together from the
   same noisy copies: ``extract_features`` concatenates them per image, ``rebuild_output`` splits them
   back into the family's own output type and containers).

``ADAPTERS`` maps model_type -> adapter class (``register_adapter``); ``REFUSED`` maps the families
that cannot be smoothed to the reason ``get_adapter`` gives (``refuse_family``); ``family_table()``
renders both as the README's table.

Public helpers for other parts of fs_mllm (booster, attacks, certification):

- ``get_adapter(model)`` -> adapter instance for a transformers/PEFT model (ValueError if unsupported).
- ``adapter.pixels_to_model_inputs(model, images01, image_mean, image_std, **kw)`` -> dict with
  ``pixel_values`` and the family kwargs (``image_grid_thw``, ``image_sizes``), differentiable.
- ``adapter.model_inputs_to_pixels(model, pixel_values, image_mean, image_std, **kw)`` -> [0,1]
  images (not clamped), a tensor when all images share a shape, else a list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

FeatureOutput = Any  # a transformers ModelOutput (BaseModelOutputWithPooling or a family subclass)


@runtime_checkable
class Booster(Protocol):
    """What ``patch_model(booster=...)`` accepts (fs_mllm.GaussianSmoothnessBooster implements it).

    ``denoise`` and ``map_features`` are each optional (absent or None means "skip this stage"):

    - ``denoise(pixels01, sigma)``: pixel-space denoiser on noisy images in [0,1] layout
      (N, 3, H, W); returns the same shape. Applied to every noisy copy before the vision tower.
    - ``map_features(features, sigma)``: feature-space mapper on the features of every noisy copy,
      (N, T, D) with D the decoder's hidden size, before unit normalisation; returns the same shape.
    - ``check_compatible(feature_dim, sigma)``: raise ValueError if the booster was not trained for
      this feature dimension / sigma.
    - ``noise_level(pixels01, sigma)`` (optional): the noise level (per image, shape (N,)) that
      ``denoise`` and ``map_features`` are told for these noisy pixels; absent means ``sigma``.
      A deterministic function of the noisy input, so certificates stay about one fixed function.
    """

    def check_compatible(self, feature_dim: int, sigma: float) -> None: ...


def per_row_level(level: Union[float, torch.Tensor], rows: int) -> Union[float, torch.Tensor]:
    """Per-image levels of ``rows * k`` pixel images (e.g. LLaVA-NeXT crops) averaged to one per feature row."""
    if isinstance(level, torch.Tensor) and level.ndim > 0 and level.numel() != rows:
        return level.reshape(rows, -1).mean(1)
    return level


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (PeftModel -> LoraModel -> PreTrainedModel).

    Every model-taking entry point passes through here, so a non-model is refused here, naming ``model``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers multimodal model), got {type(model).__name__}")
    seen = 0
    while seen < 5:
        seen += 1
        get_base = getattr(type(model), "get_base_model", None)
        if get_base is not None and type(model).__module__.startswith("peft"):
            model = model.get_base_model()
            continue
        break
    return model


def model_type_of(model: nn.Module) -> Optional[str]:
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "model_type", None)


ADAPTERS: dict[str, type["FamilyAdapter"]] = {}
# model_type -> why fs_mllm cannot smooth that family (refused with this reason instead of "unsupported")
REFUSED: dict[str, str] = {}


def register_adapter(cls: type["FamilyAdapter"]) -> type["FamilyAdapter"]:
    """Class decorator: register an adapter under each of its ``model_types``."""
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def refuse_family(model_type: str, reason: str) -> None:
    """Record a family that cannot be smoothed, so patching it names the reason instead of "no adapter"."""
    REFUSED[model_type] = reason


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> "FamilyAdapter":
    """The adapter of ``model``'s family (keyed by ``config.model_type``); ValueError if unsupported."""
    model_type = model_type_of(model)
    if model_type in REFUSED and model_type not in ADAPTERS:
        raise ValueError(f"model: fs_mllm cannot smooth model_type {model_type!r} ({type(model).__name__}): "
                         f"{REFUSED[model_type]}")
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model: fs_mllm has no adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported families (config.model_type): {supported_model_types()}. Pass a transformers "
            "multimodal model of one of these families (optionally PEFT-wrapped)."
        )
    return ADAPTERS[model_type]()


def family_table() -> str:
    """The README's "Supported families" table (markdown), generated from the registry so it cannot drift."""
    lines = ["| `model_type` | adapter | pixel layout | default mean/std | video |", "|---|---|---|---|---|"]
    names = {IMAGENET_STANDARD_STD: "0.5", OPENAI_CLIP_STD: "CLIP", (1.0, 1.0, 1.0): "none (0 / 1)"}
    for model_type in supported_model_types():
        cls = ADAPTERS[model_type]
        mean_std = names.get(tuple(cls.default_image_std), f"{tuple(cls.default_image_mean)} / {tuple(cls.default_image_std)}")
        if not cls.generates:
            video = "dual encoder (no generate)"
        else:
            video = "smoothable (`smooth_video=True`)" if cls.smooths_video else "passed through"
        lines.append(f"| `{model_type}` | `{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}` | {cls.layout} | {mean_std} | {video} |")
    for model_type in sorted(set(REFUSED) - set(ADAPTERS)):
        lines.append(f"| `{model_type}` | refused | {REFUSED[model_type]} | | |")
    return "\n".join(lines) + "\n"


def vision_patch_size(model: nn.Module) -> int:
    """The vision tower's patch size (``config.vision_config.patch_size``), for layouts that cut images into patch rows."""
    return int(unwrap_model(model).config.vision_config.patch_size)


def channel_view(values: Union[Sequence[float], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-channel values shaped (3, 1, 1) in float32 on ``like``'s device (channels sit on axis -3)."""
    tensor = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    return tensor.reshape(-1, 1, 1)


class FamilyAdapter:
    """Family knowledge for patching. Subclasses override the layout hooks; the rest is shared.

    Class attributes:
      model_types: the ``config.model_type`` values covered.
      default_image_mean / default_image_std: the family's documented processor defaults.
      feature_function: name of the image-feature method on ``feature_owner(model)``.
      per_image_kwargs: keyword arguments of the feature function that carry one row per image
        (e.g. ``image_sizes``, ``image_grid_thw``); they are sliced/grouped with the images.
      feature_fields: the output fields holding per-image features that feed the decoder; all of them
        are smoothed from the same noisy copies (``extract_features`` concatenates them per image along
        the token axis, ``rebuild_output`` splits them back).
      pixel_aliases: other keyword names under which the pixels reach the feature function (e.g.
        VideoLLaVA's deprecated ``pixel_values_images``); they are smoothed like ``pixel_values``.
      video_function: the owner's video-feature method; calls of the image function made while it runs
        are video frames (passed through unless ``FSConfig.smooth_video``).
      smooths_video: whether ``images_from_inputs`` understands the video layout that reaches the image
        function, so ``smooth_video=True`` is allowed (else patching with it is refused).
      layout: one line for the README's family table.
    """

    model_types: tuple[str, ...] = ()
    default_image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    default_image_std: tuple[float, ...] = OPENAI_CLIP_STD
    feature_function: str = "get_image_features"
    per_image_kwargs: tuple[str, ...] = ()
    feature_fields: tuple[str, ...] = ("pooler_output",)
    pixel_aliases: tuple[str, ...] = ()
    video_function: str = "get_video_features"
    smooths_video: bool = False
    layout: str = "(B, 3, H, W), one image per row"
    generates: bool = True  # False for families without generate() (dual encoders); tests route on it

    @property
    def name(self) -> str:
        return self.model_types[0] if self.model_types else type(self).__name__

    # ---- where the image-feature path lives -------------------------------------------------
    def feature_owner(self, model: nn.Module) -> nn.Module:
        """The module whose ``get_image_features`` generate() and forward() call (the inner model)."""
        hf_model = unwrap_model(model)
        owner = getattr(hf_model, "base_model", hf_model)
        if not hasattr(owner, self.feature_function):
            owner = hf_model
        if not hasattr(owner, self.feature_function):
            raise ValueError(f"model: {type(hf_model).__name__} has no {self.feature_function}(); cannot patch it")
        return owner

    def feature_dim(self, model: nn.Module) -> int:
        """Hidden size of the features fed to the language decoder (what a feature mapper sees)."""
        config = unwrap_model(model).config
        return int(config.get_text_config().hidden_size)

    def on_patch(self, model: nn.Module) -> None:
        """Called by patch_model once the patch is installed (a family warns here about what it leaves unsmoothed)."""

    # ---- pixel layout hooks (override per family) -------------------------------------------
    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        """Per-image normalised tensors in image layout (..., 3, H, W). Default: one row per image."""
        return list(pixel_values)

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        """(pixel_values, kwargs) for the feature function from a stack of same-shape images.

        ``extra`` holds the ``per_image_kwargs`` rows of these images (may be empty; families that
        can derive them from the image shape do so). Differentiable in ``images``.
        """
        return images, dict(extra)

    def per_image_rows(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> dict[str, list]:
        """For each per-image kwarg present in kwargs, one row per image (sliced with the images)."""
        rows = {}
        for key in self.per_image_kwargs:
            value = kwargs.get(key)
            if value is not None:
                rows[key] = list(torch.as_tensor(value))
        return rows

    # ---- shared logic -----------------------------------------------------------------------
    def noise_std(self, sigma: float, image_std: torch.Tensor) -> torch.Tensor:
        """Noise std in normalised space: sigma / std_c per channel, shaped (3, 1, 1)."""
        return (sigma / image_std.float()).reshape(-1, 1, 1)

    @staticmethod
    def normalise(images01: torch.Tensor, image_mean, image_std) -> torch.Tensor:
        return (images01 - channel_view(image_mean, images01).to(images01.dtype)) / channel_view(image_std, images01).to(images01.dtype)

    @staticmethod
    def denormalise(images: torch.Tensor, image_mean, image_std) -> torch.Tensor:
        return images * channel_view(image_std, images).to(images.dtype) + channel_view(image_mean, images).to(images.dtype)

    def group_images(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list["ImageGroup"]:
        """Group the images of a call by shape (and per-image kwargs) so each group stacks into a batch."""
        images = self.images_from_inputs(model, pixel_values, kwargs)
        rows = self.per_image_rows(model, pixel_values, kwargs)
        groups: dict[Any, ImageGroup] = {}
        for index, image in enumerate(images):
            key = (tuple(image.shape),) + tuple(tuple(torch.as_tensor(rows[k][index]).flatten().tolist()) for k in sorted(rows))
            group = groups.setdefault(key, ImageGroup([], [], {k: [] for k in rows}))
            group.indices.append(index)
            group.images.append(image)
            for k in rows:
                group.extra[k].append(rows[k][index])
        return list(groups.values())

    def pixels_to_model_inputs(
        self, model: nn.Module, images01: torch.Tensor, image_mean=None, image_std=None, **extra: Any
    ) -> dict:
        """[0,1] images (B, ..., 3, H, W) at processor resolution -> model inputs, differentiably.

        Returns a dict with ``pixel_values`` plus the family kwargs (``image_grid_thw`` for Qwen2-VL,
        ``image_sizes`` for LLaVA-NeXT / Mistral3 when given or derivable). ``extra`` may carry those
        per-image kwargs (one row per image). mean/std default to the family's defaults.
        """
        if not isinstance(images01, torch.Tensor) or images01.ndim < 4 or images01.shape[-3] != 3:
            raise ValueError(
                f"images01 must be a tensor (B, ..., 3, H, W) of [0,1] pixels, got "
                f"{type(images01).__name__ if not isinstance(images01, torch.Tensor) else tuple(images01.shape)}"
            )
        mean = self.default_image_mean if image_mean is None else image_mean
        std = self.default_image_std if image_std is None else image_std
        rows = {k: torch.as_tensor(v) for k, v in extra.items() if v is not None}
        pixel_values, kwargs = self.inputs_from_images(model, self.normalise(images01, mean, std), rows)
        return {"pixel_values": pixel_values, **kwargs}

    def model_inputs_to_pixels(
        self, model: nn.Module, pixel_values: torch.Tensor, image_mean=None, image_std=None, **kwargs: Any
    ) -> Union[torch.Tensor, list[torch.Tensor]]:
        """Model inputs -> [0,1] images (..., 3, H, W) (not clamped); stacked when shapes agree, else a list."""
        mean = self.default_image_mean if image_mean is None else image_mean
        std = self.default_image_std if image_std is None else image_std
        images = [self.denormalise(image, mean, std) for image in self.images_from_inputs(model, pixel_values, kwargs)]
        if len({tuple(i.shape) for i in images}) == 1:
            return torch.stack(images)
        return images

    # ---- features in, features out ----------------------------------------------------------
    def feature_parts(self, output: FeatureOutput) -> list[Any]:
        """The per-image feature containers of an output, one per smoothed part (default: each feature field;
        a plain tuple output holds the features at index 1, after the last hidden state)."""
        if not hasattr(output, "keys"):
            return [output[1]]
        return [output[field] for field in self.feature_fields]

    def extract_features(self, output: FeatureOutput, count: int) -> torch.Tensor:
        """Per-image features of a feature-function output as (count, T, D).

        Several parts (``feature_parts``: e.g. Qwen3-VL's main and DeepStack features) are concatenated
        along the token axis, so they are normalised, averaged and certified as one feature vector.
        """
        stacked = [stack_per_image(part, count) for part in self.feature_parts(output)]
        return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)

    def call_features(self, output: FeatureOutput, count: int, inputs: dict) -> torch.Tensor:
        """Per-image features (count, T, D) of one call of the feature function made with ``inputs`` (its
        keyword arguments). Default :meth:`extract_features`; families whose output holds positions that never
        reach the decoder (Mllama's padding tiles) use the call's masks to leave them out."""
        return self.extract_features(output, count)

    def regroup(self, per_image: list[torch.Tensor], call: Optional[dict]) -> Any:
        """Per-image features back into the container the original call returns (a tuple/list/tensor per
        image by default; families that pack several images per prompt override this)."""
        return per_image

    def rebuild_output(self, raw: FeatureOutput, per_image: list[torch.Tensor], return_dict: bool = True,
                       call: Optional[dict] = None) -> Any:
        """The inverse of :meth:`extract_features`: an output of ``raw``'s type whose feature fields hold
        ``per_image`` (split back into the parts ``extract_features`` concatenated). ``call`` holds the
        original call's ``pixel_values`` and kwargs, for families whose container depends on it."""
        parts = self.feature_parts(raw)
        split = [list(features.chunk(len(parts), dim=0)) if len(parts) > 1 else [features] for features in per_image]
        values = [self.container_like(template, self.regroup([pieces[i] for pieces in split], call))
                  for i, template in enumerate(parts)]
        output = self.output_from_parts(raw, values)
        if return_dict is False and hasattr(output, "to_tuple"):
            # the original's tuple positions (e.g. pooler_output at 1, after last_hidden_state): output.to_tuple()
            # would drop the unsmoothed fields and shift the features to index 0
            return tuple(output.get(key) for key in raw.keys()) if hasattr(raw, "keys") else output.to_tuple()
        return output

    def output_from_parts(self, raw: FeatureOutput, values: list[Any]) -> Any:
        """A fresh output of ``raw``'s type holding ``values`` in the feature fields (the noisy copies'
        other fields, e.g. their hidden states, are not the smoothed image's and are dropped)."""
        if not hasattr(raw, "keys"):
            return (None, values[0])
        fields = dict.fromkeys(required_fields(type(raw)))  # e.g. TimmWrapperModelOutput requires last_hidden_state
        return type(raw)(**{**fields, **dict(zip(self.feature_fields, values))})

    @staticmethod
    def container_like(template: Any, features: Any) -> Any:
        """Per-image features in the container type of ``template`` (tensor, tuple or list)."""
        if not isinstance(features, list):
            return features
        if isinstance(template, torch.Tensor):
            stacked = torch.stack(features)
            return stacked.reshape((-1,) + tuple(stacked.shape[2:])) if template.ndim == stacked.ndim - 1 else stacked
        return tuple(features) if isinstance(template, tuple) else list(features)


def required_fields(cls: type) -> list[str]:
    """Fields an output dataclass cannot be built without (they are passed as None when not smoothed)."""
    if not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def stack_per_image(part: Any, count: int) -> torch.Tensor:
    """(count, ...) from a per-image container: a tensor (count, T, D), (count, D) or (count*T, D), or a sequence."""
    if isinstance(part, torch.Tensor):  # (count, ...) as is (dual encoders: (count, D)), else (count*T, D) split
        return part if part.shape[0] == count else part.reshape((count, -1) + tuple(part.shape[1:]))
    tensors = list(part)
    if len(tensors) != count:
        raise ValueError(f"the feature function returned features for {len(tensors)} images, expected {count}")
    return torch.stack(tensors)


class ImageGroup:
    """Images of one call that share a shape: their positions, image-layout tensors and kwarg rows."""

    def __init__(self, indices: list[int], images: list[torch.Tensor], extra: dict[str, list]) -> None:
        self.indices = indices
        self.images = images
        self.extra = extra

    def stacked(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.stack(self.images), {k: torch.stack([torch.as_tensor(r) for r in v]) for k, v in self.extra.items()}

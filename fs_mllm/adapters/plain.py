"""Families whose ``pixel_values`` row is one image in the shared layout, so only registration differs.

Each row of ``pixel_values`` is smoothed as its own image: ``(3, H, W)`` for most, ``(tiles, 3, H, W)``
for PerceptionLM. Where the processor splits one picture into several crops/tiles that the model
encodes as separate rows (InternVL, GOT-OCR2, Cohere2-Vision, Aya-Vision, Llama 4), each crop is an
image of its own: it gets its own noise and its own certificate. The default mean/std are the ones
of each family's transformers image processor class (``patch_model`` reads the checkpoint's saved
processor config first).
"""

from __future__ import annotations

from torch import nn

from ..compat import at_least
from .base import (
    IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FamilyAdapter,
    register_adapter, unwrap_model,
)


class PlainAdapter(FamilyAdapter):
    """One image (or one crop) per row of ``pixel_values``; the shared FamilyAdapter layout."""

    layout = "(B, 3, H, W), one image or crop per row"


@register_adapter
class ClipMeanAdapter(PlainAdapter):
    """CLIP-normalised families: VipLLaVA, Aya-Vision, Cohere2-Vision, InternVL, GOT-OCR2, Qianfan-OCR,
    DeepSeek-VL, Janus (understanding path), Kosmos-2 (its generate() calls the outer model's own
    get_image_features, whose output is the resampled latent queries), Florence-2 (encoder-decoder: the image features enter the
    encoder, which generate runs once) and FastVLM (no processor class in transformers: the CLIP values
    are only the last fallback)."""

    model_types = ("vipllava", "aya_vision", "cohere2_vision", "internvl", "got_ocr2", "qianfan_ocr", "deepseek_vl",
                   "janus", "fast_vlm", "florence2", "kosmos-2")
    default_image_mean = OPENAI_CLIP_MEAN
    default_image_std = OPENAI_CLIP_STD


@register_adapter
class VideoLlavaAdapter(ClipMeanAdapter):
    """Video-LLaVA: images reach ``get_image_features`` as ``pixel_values_images`` (generate passes that
    name); they are smoothed like ``pixel_values``. Videos go through ``get_video_features`` unsmoothed."""

    model_types = ("video_llava",)
    pixel_aliases = ("pixel_values_images",)


@register_adapter
class Gemma3nAdapter(PlainAdapter):
    """Gemma 3n: MobileNet-v5 tower (timm), SigLIP processor defaults 0.5. Audio is untouched."""

    model_types = ("gemma3n",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD


@register_adapter
class AriaAdapter(PlainAdapter):
    """Aria: (B, 3, H, W) padded images with ``pixel_mask`` (B, H, W), which travels with each image."""

    model_types = ("aria",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    per_image_kwargs = ("pixel_mask",)
    layout = "(B, 3, H, W) + pixel_mask"


@register_adapter
class PerceptionLMAdapter(PlainAdapter):
    """PerceptionLM: pixel_values (B, tiles, 3, H, W); one image is its (tiles, 3, H, W) stack."""

    model_types = ("perception_lm",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    layout = "(B, tiles, 3, H, W), one image per row"


@register_adapter
class Llama4Adapter(PlainAdapter):
    """Llama 4: ``get_image_features`` lives on the outer model; each tile (row) is one image. What it
    returns, and so what is smoothed and certified, depends on the transformers release:

    - 5.25 and newer: the projected features (tiles, T, D_text) as ``pooler_output``, which ``forward``
      feeds the decoder: the certified features are what the decoder reads (as for LLaVA).
    - 5.24: the vision encoder's ``last_hidden_state`` (tiles, T, D_vision); ``forward`` applies the
      projector after it, a fixed map of the smoothed (and certified) vision output.
    """

    model_types = ("llama4",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    layout = "(tiles, 3, H, W), one tile per row; features = projector output (vision output before 5.25)"

    @property
    def projects_features(self) -> bool:
        """Whether this transformers' ``get_image_features`` runs the projector (5.25 on)."""
        return at_least("5.25")

    @property
    def feature_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("pooler_output",) if self.projects_features else ("last_hidden_state",)

    def feature_dim(self, model: nn.Module) -> int:
        if self.projects_features:
            return super().feature_dim(model)
        return int(unwrap_model(model).config.vision_config.vision_output_dim)

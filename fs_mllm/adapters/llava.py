"""LLaVA-1.5 (``model_type="llava"``): pixel_values (B, 3, H, W), one image per row, CLIP mean/std.

The image-feature function is ``LlavaModel.get_image_features`` (vision tower -> layer selection ->
projector); its ``pooler_output`` is a list of (T, D) features per image. Everything else (grouping,
normalisation, noise scale) is the shared default of :class:`FamilyAdapter`.
"""

from __future__ import annotations

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FamilyAdapter, register_adapter


@register_adapter
class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5 family: images (3, H, W) rows of pixel_values, default CLIP mean/std.

    ``image_sizes`` (only used with Pixtral-style vision towers) travels with each image.
    """

    model_types = ("llava",)
    default_image_mean = OPENAI_CLIP_MEAN
    default_image_std = OPENAI_CLIP_STD
    per_image_kwargs = ("image_sizes",)

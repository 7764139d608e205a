"""PaliGemma (``model_type="paligemma"``): SigLIP tower, pixel_values (B, 3, H, W), mean = std = 0.5.

``PaliGemmaModel.get_image_features`` returns a (B, T, D) tensor as ``pooler_output`` (the patched
version does too). The shared FamilyAdapter layout fits unchanged; only the defaults differ.
"""

from __future__ import annotations

from .base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, FamilyAdapter, register_adapter


@register_adapter
class PaliGemmaAdapter(FamilyAdapter):
    """PaliGemma: one (3, H, W) image per row; SiglipImageProcessor default mean/std 0.5."""

    model_types = ("paligemma",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD

"""Gemma 3 (``model_type="gemma3"``): SigLIP tower + avg-pool projector, pixel_values (N, 3, H, W).

Pan-and-scan crops (when the processor makes them) are extra rows of pixel_values; each row is smoothed
as its own image. ``Gemma3ImageProcessor`` defaults to mean = std = 0.5.
"""

from __future__ import annotations

from .base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, FamilyAdapter, register_adapter


@register_adapter
class Gemma3Adapter(FamilyAdapter):
    """Gemma 3: one (3, H, W) image per row; Gemma3ImageProcessor default mean/std 0.5."""

    model_types = ("gemma3",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD

"""Pixtral-tower families (``mistral3``, ``mistral_large4``, ``lighton_ocr``): native resolution.

pixel_values is (B, 3, H_max, W_max), padded, with ``image_sizes`` (B, 2) giving each image's real
size; Pixtral only reads the top-left ``image_sizes`` region. One image in the shared layout is that
region (3, h, w), so noise never lands on padding; images of equal size are smoothed in one batch.
Default mean/std are PixtralImageProcessor's (the CLIP values).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FamilyAdapter, register_adapter


@register_adapter
class Mistral3Adapter(FamilyAdapter):
    """Mistral 3: image = pixel_values[i, :, :h, :w]; image_sizes derived from the image shape when missing."""

    model_types = ("mistral3", "mistral_large4", "lighton_ocr")
    default_image_mean = OPENAI_CLIP_MEAN
    default_image_std = OPENAI_CLIP_STD
    per_image_kwargs = ("image_sizes",)
    layout = "(B, 3, H_max, W_max) padded + image_sizes; image = the real top-left region"

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            return list(pixel_values)
        return [image[:, :h, :w] for image, (h, w) in zip(pixel_values, torch.as_tensor(image_sizes).tolist())]

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        image_sizes = extra.get("image_sizes")
        if image_sizes is None:
            image_sizes = torch.tensor([list(images.shape[-2:])] * images.shape[0])
        return images, {"image_sizes": torch.as_tensor(image_sizes, device=images.device)}

"""LLaVA-NeXT (``llava_next``, and ``llava_next_video`` whose images take the same path): several crops per image.

pixel_values is (B, max_crops, 3, H, W) (or the crops of all images concatenated, 4-D) with
``image_sizes`` (B, 2); the number of real crops of an image follows from its size and
``config.image_grid_pinpoints`` (``image_size_to_num_patches``, as in ``LlavaNextModel``), the rest is
padding the model drops. One image in the shared image layout is its stack of real crops
(crops, 3, H, W); noise (sigma/std_c per channel) goes on every crop, never on padding.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FamilyAdapter, register_adapter, unwrap_model


@register_adapter
class LlavaNextAdapter(FamilyAdapter):
    """LLaVA-NeXT: image = (crops, 3, H, W) real crops; image_sizes travels with each image."""

    model_types = ("llava_next", "llava_next_video")
    default_image_mean = OPENAI_CLIP_MEAN
    default_image_std = OPENAI_CLIP_STD
    per_image_kwargs = ("image_sizes",)
    layout = "(B, crops, 3, H, W) + image_sizes; image = its real crops"

    def crops_per_image(self, model: nn.Module, image_sizes: torch.Tensor) -> list[int]:
        """Number of real crops of each image, the way the model computes it."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = unwrap_model(model).config
        return [
            image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=config.vision_config.image_size)
            for size in torch.as_tensor(image_sizes)
        ]

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"image_sizes is required with {self.name} pixel_values (pass the processor outputs)")
        counts = self.crops_per_image(model, image_sizes)
        if pixel_values.ndim == 5:
            return [crops[:count] for crops, count in zip(pixel_values, counts)]
        if pixel_values.ndim == 4:
            return list(torch.split(pixel_values, counts))
        raise ValueError(f"pixel_values of {self.name} must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        if images.ndim != 5:
            raise ValueError(f"{self.name} images must be (N, crops, 3, H, W), got shape {tuple(images.shape)}")
        image_sizes = extra.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"image_sizes (original (H, W) of each image) is required for {self.name} inputs")
        return images, {"image_sizes": torch.as_tensor(image_sizes, device=images.device)}

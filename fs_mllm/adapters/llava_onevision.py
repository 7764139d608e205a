"""LLaVA-OneVision (``model_type="llava_onevision"``): LLaVA-NeXT crops with a SigLIP tower.

Same pixel layout as LLaVA-NeXT ((B, crops, 3, H, W) + image_sizes), so the adapter reuses
:class:`LlavaNextAdapter`. Prompts with several images (``batch_num_images`` > 1, where the model uses
one crop per image and a different feature packing) are not smoothed yet: that raises a ValueError.
The default mean/std are 0.5, the values saved with the llava-hf OneVision checkpoints (SigLIP).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, register_adapter
from .llava_next import LlavaNextAdapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: single-image prompts; each noisy copy is encoded as a single-image prompt."""

    model_types = ("llava_onevision",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        batch_num_images = kwargs.get("batch_num_images")
        if batch_num_images is not None and any(int(n) != 1 for n in torch.as_tensor(batch_num_images).flatten()):
            raise ValueError(
                "batch_num_images: fs_mllm smooths LLaVA-OneVision prompts with one image each; "
                "split multi-image prompts into single-image calls"
            )
        return super().images_from_inputs(model, pixel_values, kwargs)

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        pixel_values, kwargs = super().inputs_from_images(model, images, extra)
        kwargs["batch_num_images"] = torch.ones(images.shape[0], dtype=torch.long, device=images.device)
        return pixel_values, kwargs

"""Kimi-K2.5 (``model_type="kimi_k25"``): per-patch pixel rows (sum_patches, 3, P, P) + image_grid_thw.

``Kimi_K25ImageProcessor.patchify`` cuts each resized image (3, H, W) into P x P patches in raster
order, (h*w, 3, P, P) per image (no merge-block reordering, unlike Qwen2-VL), and the vision tower
merges 2 x 2 patches after encoding. One image in the shared layout is (3, H, W); a video (frames
reaching ``get_image_features`` from ``get_video_features``, smoothed only with
``FSConfig.smooth_video``) is its (t, 3, H, W) frames. Processor default mean/std are 0.5.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, FamilyAdapter, register_adapter, vision_patch_size
from .qwen2_vl import split_by_grid


@register_adapter
class KimiK25Adapter(FamilyAdapter):
    """Kimi-K2.5: raster patch rows <-> (3, H, W) images (or (t, 3, H, W) clips); grid travels with each."""

    model_types = ("kimi_k25",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    per_image_kwargs = ("image_grid_thw",)
    smooths_video = True
    layout = "raster patch rows (sum_patches, 3, P, P) + image_grid_thw"

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        if pixel_values.ndim != 4:
            raise ValueError(f"kimi_k25 pixel_values must be (patches, 3, P, P), got shape {tuple(pixel_values.shape)}")
        patch = vision_patch_size(model)
        images = []
        for rows, (t, h, w) in split_by_grid(pixel_values, kwargs, "kimi_k25"):
            frames = rows.reshape(t, h, w, 3, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(t, 3, h * patch, w * patch)
            images.append(frames[0] if t == 1 else frames)
        return images

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        patch = vision_patch_size(model)
        clips = images if images.ndim == 5 else images.unsqueeze(1)
        n, t, channels, height, width = clips.shape
        h, w = height // patch, width // patch
        if h * patch != height or w * patch != width:
            raise ValueError(f"images of size {height}x{width} do not tile into {patch}px patches; resize first")
        rows = clips.reshape(n, t, channels, h, patch, w, patch).permute(0, 1, 3, 5, 2, 4, 6)
        grid = extra.get("image_grid_thw")
        if grid is None:
            grid = torch.tensor([[t, h, w]] * n, device=images.device)
        return rows.reshape(n * t * h * w, channels, patch, patch), {"image_grid_thw": grid}

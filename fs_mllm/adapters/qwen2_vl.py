"""Qwen2-VL and Qwen2.5-VL: flattened patches (sum_patches, C*T*P*P) + image_grid_thw.

The image processor (``Qwen2VLImageProcessor.patchify``) reshapes each resized image (C, H, W) to
(h/m, w/m, m, m, C, T, P, P) rows, where P = patch_size, m = spatial_merge_size and the frame is
repeated T = temporal_patch_size times, then flattens each row to C*T*P*P (channel slowest).
This adapter inverts that layout, so smoothing adds noise to the *image* (3, H, W): the noise is
per channel sigma/std_c, and the T temporal copies of a pixel get the same noise (as if the noisy
image had gone through the processor). Each image's patch block is smoothed on its own.
Only still images (grid t == 1, identical temporal copies) are smoothed; videos are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FamilyAdapter, register_adapter, unwrap_model


def patchify(images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (N*h*w, C*T*P*P) patch rows, the processor's layout (differentiable)."""
    n, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h * patch_size != height or grid_w * patch_size != width or grid_h % merge_size or grid_w % merge_size:
        raise ValueError(
            f"images of size {height}x{width} do not tile into {patch_size}px patches merged {merge_size}x{merge_size}; "
            "resize to a multiple of patch_size*merge_size first (the processor's smart_resize does)"
        )
    patches = images.reshape(n, channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh/m, gw/m, m, m, C, P, P
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return patches.reshape(n * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)


def unpatchify(rows: torch.Tensor, grid_h: int, grid_w: int, patch_size: int, merge_size: int, temporal_patch_size: int,
               channels: int = 3) -> torch.Tensor:
    """(h*w, C*T*P*P) rows of one still image -> (C, H, W), checking the temporal copies are identical."""
    patches = rows.reshape(grid_h // merge_size, grid_w // merge_size, merge_size, merge_size, channels,
                           temporal_patch_size, patch_size, patch_size)
    first = patches[:, :, :, :, :, :1]
    if not torch.equal(patches, first.expand_as(patches)):
        raise ValueError(
            "pixel_values: the temporal copies of a Qwen2-VL image patch differ (video-like input); fs_mllm "
            "smooths still images only, whose processor repeats one frame temporal_patch_size times"
        )
    image = first.squeeze(5).permute(4, 0, 2, 5, 1, 3, 6)  # C, gh/m, m, P, gw/m, m, P
    return image.reshape(channels, grid_h * patch_size, grid_w * patch_size)


@register_adapter
class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL / Qwen2.5-VL: patch rows <-> (3, H, W) images, image_grid_thw travels with each image."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    default_image_mean = OPENAI_CLIP_MEAN
    default_image_std = OPENAI_CLIP_STD
    per_image_kwargs = ("image_grid_thw",)

    @staticmethod
    def _geometry(model: nn.Module) -> tuple[int, int, int]:
        vision = unwrap_model(model).config.vision_config
        return int(vision.patch_size), int(vision.spatial_merge_size), int(vision.temporal_patch_size)

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        grid = kwargs.get("image_grid_thw")
        if grid is None:
            raise ValueError("image_grid_thw is required with Qwen2-VL pixel_values (pass the processor outputs)")
        patch, merge, temporal = self._geometry(model)
        grid = torch.as_tensor(grid).tolist()
        sizes = [t * h * w for t, h, w in grid]
        if sum(sizes) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows but image_grid_thw sums to {sum(sizes)}")
        images = []
        for rows, (t, h, w) in zip(torch.split(pixel_values, sizes), grid):
            if t != 1:
                raise ValueError(f"image_grid_thw t={t}: fs_mllm smooths still images (t == 1) only")
            images.append(unpatchify(rows, h, w, patch, merge, temporal))
        return images

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        patch, merge, temporal = self._geometry(model)
        grid = extra.get("image_grid_thw")
        if grid is None:
            count, height, width = images.shape[0], images.shape[-2], images.shape[-1]
            grid = torch.tensor([[1, height // patch, width // patch]] * count, device=images.device)
        return patchify(images, patch, merge, temporal), {"image_grid_thw": grid}

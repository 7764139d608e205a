"""patch_model / unpatch_model / certify_model on tiny random-weight instances of the real transformers classes.

Run with ``python -m pytest tests/test_patching.py`` from the repository root (fs_mllm/testing.py builds
the models offline from small configs; inputs are made by hand since processors cannot be downloaded).
"""

from __future__ import annotations

import json
import warnings


import pytest
import torch

# let plain `pytest` find the package without an install (python -m pytest adds the root itself)

from fs_mllm.adapters import get_adapter, supported_model_types
from fs_mllm.config import FSConfig
from fs_mllm.certify import certify_model
from fs_mllm.patching import get_fs_state, is_patched, patch_model, unpatch_model

from fs_mllm import testing as tiny_models
from fs_mllm.testing import CORE_FAMILIES, build, vision_module

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


class VisionCalls:
    """Records the batch size (first dim of the pixel input) of every vision-tower call."""

    def __init__(self, model) -> None:
        self.sizes: list[int] = []
        self.inputs: list[torch.Tensor] = []
        self.handle = vision_module(model).register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        self.sizes.append(pixels.shape[0])
        self.inputs.append(pixels.detach().clone())

    def reset(self) -> None:
        self.sizes.clear()
        self.inputs.clear()


def features(model, inputs) -> list[torch.Tensor]:
    """Per-image features feeding the decoder, through the same entry point generate() uses."""
    owner = get_adapter(model).feature_owner(model)
    keys = set(__import__("inspect").signature(owner.get_image_features).parameters)
    kwargs = {k: v for k, v in inputs.items() if k in keys}
    with torch.no_grad():
        pooled = owner.get_image_features(**kwargs, return_dict=True).pooler_output
    return [p.float() for p in pooled]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def patch(model, **kw):
    kw.setdefault("image_mean", MEAN)
    kw.setdefault("image_std", STD)
    return patch_model(model, **kw)


# ---------------------------------------------------------------------------------------------
# the core families (layout-specific checks; every registered family: tests/test_families.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_generate_every_family(family):
    model, inputs = build(family)
    assert get_adapter(model).name in supported_model_types()
    base_logits = logits(model, inputs)
    base_features = features(model, inputs)
    calls = VisionCalls(model)
    returned = patch(model, sigma=0.25, n_samples=4)
    assert returned is model and is_patched(model) and model.fs_config.sigma == 0.25
    calls.reset()
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 4)
    # one vision call per generate (prefill only), holding n_samples noisy copies of every image
    assert len(calls.sizes) == 1
    clean_rows = inputs["pixel_values"].shape[0]
    if family.startswith("qwen"):
        assert calls.sizes[0] == 4 * clean_rows
    elif family.startswith("llava_"):  # crops of each image
        assert calls.sizes[0] == 4 * inputs["pixel_values"].shape[0] * inputs["pixel_values"].shape[1]
    else:
        assert calls.sizes[0] == 4 * clean_rows
    smoothed = features(model, inputs)
    for base, smooth in zip(base_features, smoothed):
        assert base.shape == smooth.shape
        assert cosine(base, smooth) < 0.9999  # sigma = 0.25 changes the features
    unpatch_model(model)
    assert not is_patched(model) and not hasattr(model, "fs_config")
    assert "get_image_features" not in get_adapter(model).feature_owner(model).__dict__
    assert torch.equal(logits(model, inputs), base_logits)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_beam_search_sampling_and_forward(family):
    """Encoded once, then expanded by generate for beams / several return sequences; forward works too."""
    model, inputs = build(family)
    patch(model, sigma=0.25, n_samples=4)
    calls = VisionCalls(model)
    out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 2 * inputs["input_ids"].shape[0] and len(calls.sizes) == 1
    model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert len(calls.sizes) == 2
    assert torch.isfinite(logits(model, inputs)).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next", "mistral3"])
def test_tiny_sigma_keeps_direction(family):
    model, inputs = build(family)
    base = features(model, inputs)
    patch(model, sigma=1e-4, n_samples=16)
    smooth = features(model, inputs)
    close = []
    for b, s in zip(base, smooth):
        close.append(cosine(b, s))
        assert close[-1] > 0.999
        # rescaled to the feature scale the decoder expects
        assert abs(s.norm().item() / b.norm().item() - 1) < 1e-2
    patch(model, sigma=0.25, n_samples=16)
    for b, s, c in zip(base, features(model, inputs), close):
        assert cosine(b, s) < min(0.9999, c - 1e-5)


# ---------------------------------------------------------------------------------------------
# noise scale and layout
# ---------------------------------------------------------------------------------------------

def test_per_channel_noise_scale_llava():
    model, inputs = build("llava", batch=1)
    std = [0.2, 0.4, 0.8]
    calls = VisionCalls(model)
    patch(model, sigma=0.3, n_samples=32, image_mean=[0.5] * 3, image_std=std)
    features(model, inputs)
    noise = calls.inputs[0] - inputs["pixel_values"]  # (32, 3, H, W)
    measured = noise.transpose(0, 1).reshape(3, -1).std(dim=1)
    expected = torch.tensor([0.3 / s for s in std])
    assert torch.allclose(measured, expected, rtol=0.05)
    assert abs(noise.mean().item()) < 0.05


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_per_channel_noise_scale_qwen_patch_layout(family):
    model, inputs = build(family, batch=1)
    cfg = model.config.vision_config
    std = [0.2, 0.4, 0.8]
    calls = VisionCalls(model)
    patch(model, sigma=0.3, n_samples=32, image_mean=[0.5] * 3, image_std=std)
    features(model, inputs)
    rows = calls.inputs[0].float()  # (32 * patches, C*T*P*P)
    noise = rows - inputs["pixel_values"].repeat(32, 1)
    noise = noise.reshape(-1, 3, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    # the T temporal copies of a pixel carry the same noise (noise is added to the image)
    assert torch.equal(noise[:, :, 0], noise[:, :, 1])
    measured = noise[:, :, 0].transpose(0, 1).reshape(3, -1).std(dim=1)
    assert torch.allclose(measured, torch.tensor([0.3 / s for s in std]), rtol=0.05)


def test_qwen_patchify_matches_image_processor():
    transformers = pytest.importorskip("transformers")
    try:
        processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    except Exception as error:  # pragma: no cover - depends on optional torchvision
        pytest.skip(f"Qwen2VLImageProcessor unavailable offline: {error}")
    from fs_mllm.adapters.qwen2_vl import patchify

    image = (torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    out = processor(images=image, do_resize=False, return_tensors="pt")
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    ours = patchify(((image.float() / 255 - mean) / std)[None], 4, 2, 2)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert torch.allclose(ours, out["pixel_values"].float(), atol=1e-4)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_pixels_roundtrip(family):
    model, inputs = build(family, batch=2)
    adapter = get_adapter(model)
    extra = {k: v for k, v in inputs.items() if k in adapter.per_image_kwargs}
    pixels = adapter.model_inputs_to_pixels(model, inputs["pixel_values"], MEAN, STD, **extra)
    assert pixels.shape[-3] == 3
    back = adapter.pixels_to_model_inputs(model, pixels, MEAN, STD, **extra)
    real = adapter.images_from_inputs(model, inputs["pixel_values"], extra)
    again = adapter.images_from_inputs(model, back["pixel_values"], {k: back[k] for k in extra if k in back})
    for a, b in zip(real, again):
        assert torch.allclose(a, b, atol=1e-5)
    # differentiable: gradients reach the [0,1] images
    images = pixels.clone().requires_grad_(True)
    adapter.pixels_to_model_inputs(model, images, MEAN, STD, **extra)["pixel_values"].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


# ---------------------------------------------------------------------------------------------
# reproducibility, reconfiguration, settings
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_output_and_generate_once_per_call():
    model, inputs = build("llava")
    patch(model, sigma=0.25, n_samples=8, seed=3)
    calls = VisionCalls(model)
    first = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    second = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert calls.sizes == [16, 16]  # once per generate, never per decoded token
    assert torch.equal(first.sequences, second.sequences)
    assert all(torch.equal(a, b) for a, b in zip(first.scores, second.scores))
    patch(model, sigma=0.25, n_samples=8, seed=4)
    third = features(model, inputs)
    patch(model, sigma=0.25, n_samples=8, seed=3)
    assert not torch.equal(third[0], features(model, inputs)[0])


def test_patch_twice_reconfigures():
    model, inputs = build("llava")
    owner = get_adapter(model).feature_owner(model)
    base_logits = logits(model, inputs)
    patch(model, sigma=0.25, n_samples=4)
    wrapper = owner.__dict__["get_image_features"]
    patch(model, sigma=0.5, n_samples=6, seed=1)
    assert owner.__dict__["get_image_features"] is wrapper  # not wrapped twice
    assert model.fs_config == FSConfig(sigma=0.5, n_samples=6, seed=1)
    calls = VisionCalls(model)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert calls.sizes == [6 * 2]
    patch(model, config=FSConfig(sigma=0.1, n_samples=3))
    assert get_fs_state(model).config.n_samples == 3
    unpatch_model(model)
    assert torch.equal(logits(model, inputs), base_logits)
    unpatch_model(model)  # no-op on an unpatched model


def _change_vision_weight(model) -> None:
    """Flip and scale the first MLP weight of the vision tower (every family has an fc1)."""
    weight = next(p for name, p in vision_module(model).named_parameters() if name.endswith("fc1.weight"))
    with torch.no_grad():
        weight.mul_(-3.0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_deepcopy_of_a_patched_model_is_an_independent_patched_model(family):
    """Issue 14.2: the copy's wrapper must run the copy (its weights), not the original; unpatching or
    re-patching one must not touch the other."""
    import copy

    model, inputs = build(family)
    patch(model, sigma=0.25, n_samples=4, seed=2)
    before = features(model, inputs)
    clone = copy.deepcopy(model)
    assert is_patched(clone) and get_fs_state(clone) is not get_fs_state(model)
    _change_vision_weight(clone)
    reference, _ = build(family)  # the same weight change on a fresh model, patched the same way
    _change_vision_weight(reference)
    patch(reference, sigma=0.25, n_samples=4, seed=2)
    expected = features(reference, inputs)
    copied = features(clone, inputs)
    for a, b in zip(copied, expected):
        torch.testing.assert_close(a, b)
    assert cosine(copied[0], before[0]) < 0.999  # the weight change shows
    for a, b in zip(features(model, inputs), before):  # the original is unaffected
        assert torch.equal(a, b)
    # re-patching the copy reconfigures the copy only
    patch(clone, sigma=0.5, n_samples=4, seed=2)
    patch(reference, sigma=0.5, n_samples=4, seed=2)
    for a, b in zip(features(clone, inputs), features(reference, inputs)):
        torch.testing.assert_close(a, b)
    assert get_fs_state(model).config.sigma == 0.25
    # unpatching the copy restores the copy's own original function
    unpatch_model(clone)
    unpatch_model(reference)
    assert not is_patched(clone) and is_patched(model)
    for a, b in zip(features(clone, inputs), features(reference, inputs)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(logits(clone, inputs), logits(reference, inputs))
    for a, b in zip(features(model, inputs), before):
        assert torch.equal(a, b)


def test_certify_model_alpha_and_method_default_to_the_patch_config():
    """Issue 14.8: FSConfig.alpha/method are what certify_model uses unless given explicitly."""
    model, inputs = build("llava")
    images01 = (inputs["pixel_values"] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1)
    patch(model, config=FSConfig(sigma=0.1, n_samples=2, alpha=0.05, method="hoeffding"))
    default = certify_model(model, images01, n=20)[0]
    assert (default.alpha, default.method) == (0.05, "hoeffding")
    explicit = certify_model(model, images01, n=20, alpha=0.01, method="betting")[0]
    assert (explicit.alpha, explicit.method) == (0.01, "betting")
    unpatch_model(model)
    unpatched = certify_model(model, images01, n=20, sigma=0.1, image_mean=MEAN, image_std=STD)[0]
    assert (unpatched.alpha, unpatched.method) == (FSConfig().alpha, FSConfig().method)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_smoothed_path_is_differentiable_and_positional_call(family):
    """Attacks need gradients through the Monte-Carlo average; outer classes may pass pixel_values positionally."""
    model, inputs = build(family, batch=1)
    patch(model, sigma=0.25, n_samples=2)
    pixels = inputs["pixel_values"].clone().requires_grad_(True)
    extra = {k: v for k, v in inputs.items() if k == "image_grid_thw"}
    out = model.get_image_features(pixels, **extra)  # the outer class's method, positional pixel_values
    pooled = out.pooler_output
    torch.stack(list(pooled)).float().pow(2).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_chunk_size_does_not_change_result():
    model, inputs = build("qwen2_vl")
    patch(model, sigma=0.25, n_samples=6, chunk_size=6)
    whole = features(model, inputs)
    calls = VisionCalls(model)
    patch(model, sigma=0.25, n_samples=6, chunk_size=4)
    chunked = features(model, inputs)
    assert len(calls.sizes) == 2
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-5)


def test_token_mode_generates():
    model, inputs = build("llava")
    base = features(model, inputs)
    patch(model, sigma=1e-4, n_samples=4, normalize="token")
    smooth = features(model, inputs)
    # each token keeps its own direction and scale
    assert torch.allclose(smooth[0].norm(dim=-1), base[0].norm(dim=-1), rtol=1e-2)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_mixed_image_sizes_smoothed_per_image():
    """Qwen2-VL images of different grids: each image's patch block is smoothed on its own."""
    model, _ = build("qwen2_vl")
    a = tiny_models._qwen_inputs(1, grid=(1, 4, 4), seed=1)
    b = tiny_models._qwen_inputs(1, grid=(1, 4, 8), seed=2)
    batch = {
        "input_ids": torch.nn.utils.rnn.pad_sequence([a["input_ids"][0], b["input_ids"][0]], batch_first=True),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
        "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
    }
    batch["attention_mask"] = (batch["input_ids"] != 0).long()
    batch["mm_token_type_ids"] = (batch["input_ids"] == tiny_models.IMAGE_TOKEN).long()
    patch(model, sigma=0.25, n_samples=4)
    together = features(model, batch)
    alone_a = features(model, a)[0]
    alone_b = features(model, b)[0]
    assert together[0].shape == alone_a.shape and together[1].shape == alone_b.shape
    assert torch.allclose(together[0], alone_a, atol=1e-5)
    assert torch.allclose(together[1], alone_b, atol=1e-5)
    model.generate(**batch, max_new_tokens=2, do_sample=False)


def test_batch_neighbours_and_position_do_not_change_an_images_features():
    """One image's smoothed features are the same alone, second in a batch, and next to a copy of itself
    (the noise stream belongs to the image, not to its batch slot); two different images differ in noise."""
    model, inputs = build("llava", batch=1)
    image = inputs["pixel_values"]
    neighbour = torch.flip(image, dims=[-1])
    patch(model, sigma=0.25, n_samples=4)
    alone = features(model, {"pixel_values": image})[0]
    second = features(model, {"pixel_values": torch.cat([neighbour, image])})
    twice = features(model, {"pixel_values": torch.cat([image, image])})
    assert torch.allclose(second[1], alone, atol=1e-5)
    assert torch.allclose(twice[0], alone, atol=1e-5) and torch.allclose(twice[1], alone, atol=1e-5)
    assert not torch.allclose(second[0], alone, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# mean/std resolution and validation
# ---------------------------------------------------------------------------------------------

def test_mean_std_sources(tmp_path):
    model, inputs = build("llava")
    with pytest.warns(UserWarning, match=r"image_std=\[0\.268"):
        patch_model(model, sigma=0.25)
    assert torch.allclose(get_fs_state(model).image_std, torch.tensor(STD))

    class Proc:
        class image_processor:
            image_mean = [0.5, 0.5, 0.5]
            image_std = [0.25, 0.5, 1.0]

    patch_model(model, sigma=0.25, processor=Proc())
    assert get_fs_state(model).image_std.tolist() == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="image_mean and image_std"):
        patch_model(model, image_mean=[0.5] * 3)
    with pytest.raises(ValueError, match="sigma"):
        patch_model(model, sigma=-1)
    with pytest.raises(ValueError, match="n_samples"):
        patch_model(model, n_samples=0)


def test_mean_std_from_hf_cache(tmp_path, monkeypatch):
    """A Hub id in name_or_path: the preprocessor config is read from the HF cache, offline."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--someorg--tiny-llava" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someorg--tiny-llava" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-llava" / "refs" / "main").write_text("abc123")
    (snapshot / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.3, 0.2, 0.1]}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, _ = build("llava")
    model.name_or_path = "someorg/tiny-llava"  # what from_pretrained("someorg/tiny-llava") sets
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        patch_model(model, sigma=0.25)
    assert get_fs_state(model).image_std.tolist() == pytest.approx([0.3, 0.2, 0.1])


def test_unsupported_model_lists_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**tiny_models._text()))
    with pytest.raises(ValueError, match="supported families.*llava.*qwen2_vl"):
        patch_model(model, sigma=0.25)


# ---------------------------------------------------------------------------------------------
# booster protocol
# ---------------------------------------------------------------------------------------------

class RecordingBooster:
    """Denoiser blends towards 0.5 grey; mapper adds a constant; both record what they saw."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.seen_pixels: list[torch.Tensor] = []
        self.seen_features: list[torch.Tensor] = []
        self.checked = None

    def check_compatible(self, feature_dim: int, sigma: float) -> None:
        self.checked = (feature_dim, sigma)
        if feature_dim != self.dim:
            raise ValueError(f"booster trained for feature_dim={self.dim}, got {feature_dim}")

    def denoise(self, pixels01: torch.Tensor, sigma: float) -> torch.Tensor:
        self.seen_pixels.append(pixels01.detach().clone())
        return 0.5 * pixels01 + 0.25

    def map_features(self, features: torch.Tensor, sigma: float) -> torch.Tensor:
        self.seen_features.append(features.detach().clone())
        return features + 1.0


def test_booster_applied_in_noisy_path():
    model, inputs = build("llava", batch=1)
    booster = RecordingBooster(dim=32)
    calls = VisionCalls(model)
    patch(model, sigma=1e-4, n_samples=4, booster=booster, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    assert booster.checked == (32, 1e-4)
    smooth = features(model, inputs)[0]
    clean01 = inputs["pixel_values"] * 0.25 + 0.5
    assert booster.seen_pixels[0].shape == (4, 3, 32, 32)
    assert torch.allclose(booster.seen_pixels[0][0], clean01[0], atol=1e-3)  # [0,1] layout, tiny noise
    denoised = ((0.5 * clean01 + 0.25) - 0.5) / 0.25
    assert torch.allclose(calls.inputs[0][0], denoised[0], atol=1e-2)  # back to normalised space
    assert booster.seen_features[0].shape[0] == 4
    unpatch_model(model)
    raw = features(model, {**inputs, "pixel_values": denoised})[0] + 1.0
    assert cosine(raw, smooth) > 0.999
    with pytest.raises(ValueError, match="feature_dim"):
        patch(model, booster=RecordingBooster(dim=7))


class LevelBooster(RecordingBooster):
    """Tells its stages a per-copy level computed from the noisy pixels; records the levels it got."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.levels: list = []

    def noise_level(self, pixels01: torch.Tensor, sigma: float) -> torch.Tensor:
        return pixels01.flatten(1).std(1)

    def denoise(self, pixels01: torch.Tensor, sigma) -> torch.Tensor:
        self.levels.append(("denoise", sigma))
        return pixels01

    def map_features(self, features: torch.Tensor, sigma) -> torch.Tensor:
        self.levels.append(("map", sigma))
        return features


def test_booster_noise_level_reaches_both_stages_per_copy():
    model, inputs = build("llava", batch=1)
    booster = LevelBooster(dim=32)
    patch(model, sigma=0.2, n_samples=3, booster=booster, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    features(model, inputs)
    (stage_a, level_a), (stage_b, level_b) = booster.levels
    assert (stage_a, stage_b) == ("denoise", "map")
    assert level_a.shape == (3,) and torch.equal(level_a, level_b)
    # each copy's level is that copy's own pixel std: noisy copies differ from each other
    assert len(set(level_a.tolist())) == 3


# ---------------------------------------------------------------------------------------------
# certification
# ---------------------------------------------------------------------------------------------

def test_certify_model_images_and_processor_outputs():
    model, inputs = build("llava")
    images01 = (inputs["pixel_values"] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1)
    with pytest.raises(ValueError, match="sigma is required"):
        certify_model(model, images01, n=10)
    certs = certify_model(model, images01, n=200, alpha=0.01, sigma=0.01, radius=0.005, image_mean=MEAN, image_std=STD)
    assert len(certs) == 2
    for cert in certs:
        assert 0.9 < cert.score_lower <= cert.score_mean <= 1
        assert cert.bound == pytest.approx(cert.fcsb(0.005)) and cert.bound > 0
    loose = certify_model(model, images01, n=200, alpha=0.01, sigma=0.5, image_mean=MEAN, image_std=STD)
    assert all(l.score_mean < c.score_mean for l, c in zip(loose, certs))
    # processor-style dict on a patched model: sigma from the patch, same noise -> same scores
    patch(model, sigma=0.01)
    again = certify_model(model, {"pixel_values": model_inputs(images01)}, n=200, alpha=0.01)
    assert [c.score_mean for c in again] == pytest.approx([c.score_mean for c in certs], abs=1e-4)
    with pytest.raises(ValueError, match="differs"):
        certify_model(model, images01, n=10, sigma=0.3)


def model_inputs(images01):
    return (images01 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_certify_qwen_with_booster():
    model, inputs = build("qwen2_vl")
    patch(model, sigma=0.25, booster=RecordingBooster(dim=32))
    certs = certify_model(model, {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}, n=20, alpha=0.01)
    assert len(certs) == 2 and all(0 <= c.score_lower <= c.score_mean <= 1 for c in certs)
    assert get_fs_state(model).booster.seen_features  # the certificate is for the boosted encoder


# ---------------------------------------------------------------------------------------------
# PEFT, accelerate, dtypes, quantisation, full-size configs
# ---------------------------------------------------------------------------------------------

def test_peft_lora_wrapped_model():
    peft = pytest.importorskip("peft")
    model, inputs = build("llava")
    lora = peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", lora_alpha=8)
    wrapped = peft.get_peft_model(model, lora)
    base_logits = logits(wrapped, inputs)
    calls = VisionCalls(model)
    assert patch(wrapped, sigma=0.25, n_samples=4) is wrapped
    assert is_patched(wrapped) and is_patched(model) and wrapped.fs_config.sigma == 0.25
    out = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 and calls.sizes == [8]
    unpatch_model(wrapped)
    assert torch.equal(logits(wrapped, inputs), base_logits)


def test_device_map_offload_and_saved_preprocessor_config(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, inputs = build("llava")
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.2, 0.3, 0.4]}))
    loaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=str(tmp_path / "offload"))
    assert getattr(loaded, "hf_device_map", None)
    base_logits = logits(loaded, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # mean/std found in the saved config: no fallback warning
        patch_model(loaded, sigma=0.25, n_samples=4)
    assert get_fs_state(loaded).image_std.tolist() == pytest.approx([0.2, 0.3, 0.4])
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    unpatch_model(loaded)
    assert torch.equal(logits(loaded, inputs), base_logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_half_precision(family, dtype):
    model, inputs = build(family, dtype=dtype)
    base = features(model, inputs)
    patch(model, sigma=1e-3, n_samples=4)
    owner = get_adapter(model).feature_owner(model)
    with torch.no_grad():
        raw = owner.get_image_features(**{k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")})
    assert raw.pooler_output[0].dtype == dtype
    for b, s in zip(base, features(model, inputs)):
        assert cosine(b, s) > 0.99
    model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_bitsandbytes_4bit_language_model(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    # blockwise 4-bit needs in_features >= the 64-value block: use 64/128 hidden sizes
    model, inputs = tiny_models.build_llava(config=tiny_models.llava_config(vision_hidden=64, text_hidden=128))
    model.save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    try:
        loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
        loaded.generate(**inputs, max_new_tokens=1, do_sample=False)
    except Exception as error:  # pragma: no cover - depends on the bitsandbytes CPU backend
        pytest.skip(f"bitsandbytes {bnb.__version__} 4-bit does not run on this CPU-only machine: {error}")
    assert isinstance(loaded.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    patch(loaded, sigma=0.25, n_samples=4)
    calls = VisionCalls(loaded)
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 and calls.sizes == [8]


def test_full_size_configs_on_meta_device():
    from transformers import (
        CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
    )

    llava_cfg = LlavaConfig(  # llava-hf/llava-1.5-7b-hf
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rms_norm_eps=1e-5),
        image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    qwen_cfg = Qwen2_5_VLConfig(  # Qwen/Qwen2.5-VL-7B-Instruct
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                             "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    )
    for cls, cfg, dim in ((LlavaForConditionalGeneration, llava_cfg, 4096), (Qwen2_5_VLForConditionalGeneration, qwen_cfg, 3584)):
        with torch.device("meta"):
            model = cls(cfg)
        patch(model, sigma=0.25)
        assert is_patched(model) and get_adapter(model).feature_dim(model) == dim
        unpatch_model(model)
        assert not is_patched(model)


@pytest.mark.parametrize("processor_type", ["Gemma4ImageProcessor", "EfficientNetImageProcessor", "CLIPImageProcessor"])
def test_saved_config_fields_it_omits_take_the_processor_class_defaults(tmp_path, processor_type):
    """A preprocessor_config.json that leaves out do_normalize (Gemma 4: False) or include_top (EfficientNet:
    True) is read the way the processor loaded from it works: the noise scale is the processor's affine map."""
    import numpy as np
    from transformers import AutoImageProcessor

    from fs_mllm.normalization import _mean_std_from_processor, _mean_std_from_saved_config

    saved = {"image_processor_type": processor_type, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.5, 0.25, 0.2],
             "do_resize": False, "do_center_crop": False}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision -> PIL backend fallback
        processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    mean, std = _mean_std_from_saved_config(str(tmp_path))
    expected = _mean_std_from_processor(processor)  # the loaded processor's own settings
    torch.testing.assert_close(mean, expected[0])
    torch.testing.assert_close(std, expected[1])
    if processor_type == "Gemma4ImageProcessor":  # it does not normalise: pixel_values are the [0,1] pixels
        assert mean.tolist() == [0.0] * 3 and std.tolist() == [1.0] * 3
        return
    pixels = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        produced = torch.as_tensor(np.asarray(processor(images=pixels, return_tensors="np")["pixel_values"][0]))
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(produced.float(), (x - mean.view(3, 1, 1)) / std.view(3, 1, 1), rtol=1e-5, atol=1e-5)


def test_scoped_replacements_of_the_feature_function_nest_and_refuse_out_of_order_exits():
    """replaced_feature_function (the recorder's and the base path's swap): nested blocks restore in turn, the patch
    stays visible under a wrapper, and blocks closed out of order still end with the patch back."""
    from fs_mllm.patching import replaced_feature_function

    model, _ = build("llava")
    patch_model(model, sigma=0.25)
    adapter = get_adapter(model)
    owner = adapter.feature_owner(model)
    patched = owner.__dict__[adapter.feature_function]

    def wrap(function):
        def wrapper(*args, **kwargs):
            return function(*args, **kwargs)
        wrapper.__wrapped__ = function
        return wrapper

    with replaced_feature_function(model, adapter, wrap) as outer:
        with replaced_feature_function(model, adapter, wrap) as inner:
            assert owner.__dict__[adapter.feature_function] is inner and is_patched(model)
        assert owner.__dict__[adapter.feature_function] is outer
    assert owner.__dict__[adapter.feature_function] is patched
    first = replaced_feature_function(model, adapter, wrap)
    second = replaced_feature_function(model, adapter, wrap)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # out of order: the later block's function stays in place
    assert owner.__dict__[adapter.feature_function] is not patched and is_patched(model)
    second.__exit__(None, None, None)  # and takes the earlier one's with it
    assert owner.__dict__[adapter.feature_function] is patched and is_patched(model)


def test_patching_inside_a_scoped_replacement_unpatches_to_the_original():
    """patch_model while a recorder is in place (the patch wraps the recorder), the recorder's block closing, then
    unpatch_model: the original function comes back, not the closed recorder."""
    from fs_mllm.patching import replaced_feature_function

    model, _ = build("llava")
    adapter = get_adapter(model)
    owner = adapter.feature_owner(model)
    assert adapter.feature_function not in owner.__dict__
    with replaced_feature_function(model, adapter, lambda function: (lambda *a, **k: function(*a, **k))):
        patch_model(model, sigma=0.25, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert is_patched(model)
    unpatch_model(model)
    assert adapter.feature_function not in owner.__dict__ and not is_patched(model)

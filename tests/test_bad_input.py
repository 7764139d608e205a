"""Every public entry point refuses bad input with a ValueError that names the parameter (issue 14).

A wrong value must never run on silently (a certificate about another distribution) nor crash deep
inside torch with an error that does not say which argument to fix.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import fs_mllm
from fs_mllm import (
    AttackConfig, FSConfig, GaussianSmoothnessBooster, GSBConfig, attack, boosted_encoder, certified_radius,
    certify_features, certify_model, certify_prediction, fcsb, patch_model, score_lower_bound, smooth_features,
)
from fs_mllm.config import SIGMA_MAX, CertifyConfig
from fs_mllm.booster.model import CONFIG_NAME, WEIGHTS_NAME

from fs_mllm.testing import build

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def encoder(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x.float().flatten(1)[:, :8] * 3) + 0.1


IMAGES = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
CLASSES = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def raises_naming(parameter: str):
    return pytest.raises(ValueError, match=re.escape(parameter))


@pytest.fixture(scope="module")
def llava():
    model, inputs = build("llava")
    images01 = (inputs["pixel_values"] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1)
    return model, images01


# the image-taking entry points, each as f(images) with everything else valid
IMAGE_ENTRY_POINTS = {
    "smooth_features": lambda images: smooth_features(encoder, images, FSConfig(n_samples=2)),
    "certify_features": lambda images: certify_features(encoder, images, 0.25, n=4),
    "certify_prediction": lambda images: certify_prediction(encoder, images, CLASSES, 0.25, n=4),
}

BAD_IMAGES = {
    "uint8": ((IMAGES * 255).to(torch.uint8), "float"),
    "int64": (IMAGES.round().long(), "float"),
    "bool": (IMAGES > 0.5, "float"),
    "empty": (torch.rand(0, 3, 8, 8), "empty"),
}


@pytest.mark.parametrize("entry", sorted(IMAGE_ENTRY_POINTS))
@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
def test_non_float_and_empty_images(entry, bad):
    images, what = BAD_IMAGES[bad]
    with pytest.raises(ValueError, match=rf"images.*{what}|{what}.*images"):
        IMAGE_ENTRY_POINTS[entry](images)


@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
def test_non_float_and_empty_images_model_entry_points(llava, bad):
    model, _ = llava
    images, what = BAD_IMAGES[bad]
    images = torch.nn.functional.interpolate(images.float(), size=32).to(images.dtype) if images.numel() else torch.rand(0, 3, 32, 32)
    with pytest.raises(ValueError, match=rf"images_or_pixel_values.*{what}|{what}.*images_or_pixel_values"):
        certify_model(model, images, n=4, sigma=0.25, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match=rf"images01.*{what}|{what}.*images01"):
        attack(model, None, images, None, AttackConfig(eps=0.5, steps=1), image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="pixel_values.*empty"):
        certify_model(model, {"pixel_values": torch.rand(0, 3, 32, 32)}, n=4, sigma=0.25, image_mean=MEAN, image_std=STD)


def test_empty_image_message_is_clear():
    with pytest.raises(ValueError, match="images is empty"):
        certify_features(encoder, torch.rand(0, 3, 8, 8), 0.25, n=4)


def test_uint8_message_says_how_to_fix():
    with pytest.raises(ValueError, match=r"images must be a floating-point tensor.*\[0, ?1\]"):
        smooth_features(encoder, (IMAGES * 255).to(torch.uint8))


BAD_SIGMAS = [float("nan"), float("inf"), -1.0, 0.0, 1e300, SIGMA_MAX * 1.01, True, "0.25", None]


@pytest.mark.parametrize("sigma", BAD_SIGMAS, ids=repr)
def test_bad_sigma_everywhere(llava, sigma):
    model, images01 = llava
    calls = [
        lambda: FSConfig(sigma=sigma),
        lambda: smooth_features(encoder, IMAGES, FSConfig().replace(sigma=sigma)),
        lambda: certify_features(encoder, IMAGES, sigma, n=4),
        lambda: certify_prediction(encoder, IMAGES, CLASSES, sigma, n=4),
        lambda: certify_model(model, images01, n=4, sigma=sigma, image_mean=MEAN, image_std=STD),
        lambda: patch_model(model, sigma=sigma, image_mean=MEAN, image_std=STD),
        lambda: fcsb(0.9, 0.1, sigma),
        lambda: certified_radius(0.9, sigma),
        lambda: boosted_encoder(encoder, None, sigma),
    ]
    for call in calls:
        with raises_naming("sigma"):
            call()
    assert not fs_mllm.is_patched(model)


def test_sigma_cap_is_documented_and_reachable():
    assert SIGMA_MAX == 10.0 and f"({0}, {SIGMA_MAX:g}]" in FSConfig.__doc__
    assert certify_features(encoder, IMAGES, SIGMA_MAX, n=4)[0].score_lower >= 0  # the cap itself runs


def test_mutating_a_config_is_validated():
    config = FSConfig()
    for name, value in [("sigma", 1e300), ("seed", 2**70), ("n_samples", 0), ("alpha", None), ("method", "x")]:
        with raises_naming(name):
            setattr(config, name, value)
    assert config == FSConfig()


def test_certify_config_is_validated_and_round_trips():
    config = CertifyConfig()
    for name, value in [("n", 1), ("n", 2.5), ("alpha", 1.0), ("method", "x"), ("n0", 0), ("max_new_tokens", True)]:
        with raises_naming(name):
            setattr(config, name, value)
        with raises_naming(name):
            CertifyConfig(**{name: value})
    assert config == CertifyConfig()
    changed = config.replace(n=50, n0=5)
    assert CertifyConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed != config
    with raises_naming("CertifyConfig"):
        CertifyConfig.from_dict({"n": 50, "sigma": 0.25})  # sigma is FSConfig's


BAD_N = [1, 0, -5, 2.5, True, "10", None]


@pytest.mark.parametrize("n", BAD_N, ids=repr)
def test_bad_n(llava, n):
    model, images01 = llava
    for call in [
        lambda: certify_features(encoder, IMAGES, 0.25, n=n),
        lambda: certify_prediction(encoder, IMAGES, CLASSES, 0.25, n=n),
        lambda: certify_model(model, images01, n=n, sigma=0.25, image_mean=MEAN, image_std=STD),
    ]:
        with raises_naming("n"):
            call()
    if n == 1:  # a certificate needs n >= 2; generate's n0 may be one noisy copy
        assert FSConfig(n_samples=1).n_samples == 1
        return
    with raises_naming("n_samples"):
        FSConfig(n_samples=n)
    with raises_naming("n_samples"):
        patch_model(model, n_samples=n, image_mean=MEAN, image_std=STD)


BAD_ALPHAS = [None, 0, 1, 2, -0.1, float("nan"), True, "0.01"]


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_bad_alpha(llava, alpha):
    model, images01 = llava
    calls = [
        lambda: FSConfig(alpha=alpha),
        lambda: certify_features(encoder, IMAGES, 0.25, n=4, alpha=alpha),
        lambda: certify_prediction(encoder, IMAGES, CLASSES, 0.25, n=4, alpha=alpha),
        lambda: score_lower_bound([0.5, 0.6, 0.7], alpha),
    ]
    if alpha is not None:  # certify_model: alpha=None means "the patch's FSConfig.alpha"
        calls.append(lambda: certify_model(model, images01, n=4, alpha=alpha, sigma=0.25, image_mean=MEAN, image_std=STD))
    for call in calls:
        with raises_naming("alpha"):
            call()


@pytest.mark.parametrize("method", ["t-test", "", 3, "Bernstein"], ids=repr)
def test_bad_method(llava, method):
    model, images01 = llava
    for call in [
        lambda: FSConfig(method=method),
        lambda: certify_features(encoder, IMAGES, 0.25, n=4, method=method),
        lambda: certify_prediction(encoder, IMAGES, CLASSES, 0.25, n=4, method=method),
        lambda: certify_model(model, images01, n=4, method=method, sigma=0.25, image_mean=MEAN, image_std=STD),
        lambda: score_lower_bound([0.5, 0.6, 0.7], 0.01, method),
    ]:
        with raises_naming("method"):
            call()


BAD_SEEDS = ["a", -1, 2**70, 2**63, True, 1.5, None]


@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_bad_seed(llava, seed):
    model, images01 = llava
    calls = [
        lambda: FSConfig(seed=seed),
        lambda: certify_features(encoder, IMAGES, 0.25, n=4, seed=seed),
        lambda: certify_prediction(encoder, IMAGES, CLASSES, 0.25, n=4, seed=seed),
        lambda: patch_model(model, seed=seed, image_mean=MEAN, image_std=STD),
        lambda: AttackConfig(seed=seed),
    ]
    if seed is not None:  # certify_model: seed=None means "the patch's seed"
        calls.append(lambda: certify_model(model, images01, n=4, seed=seed, sigma=0.25, image_mean=MEAN, image_std=STD))
    for call in calls:
        with raises_naming("seed"):
            call()
    assert not fs_mllm.is_patched(model)


def test_largest_seed_runs():
    certify_features(encoder, IMAGES, 0.25, n=4, seed=2**63 - 1)


def test_bad_chunk_size_and_normalize():
    for value in (0, -1, 2.5, True, "8"):
        with raises_naming("chunk_size"):
            certify_features(encoder, IMAGES, 0.25, n=4, chunk_size=value)
    with raises_naming("normalize"):
        certify_features(encoder, IMAGES, 0.25, n=4, normalize="patch")


@pytest.mark.parametrize("given", [dict(image_std=STD), dict(image_mean=MEAN)], ids=["std_only", "mean_only"])
def test_image_mean_and_std_come_together(llava, given):
    model, images01 = llava
    with raises_naming("image_mean"):
        certify_model(model, images01, n=4, sigma=0.25, **given)
    with raises_naming("image_mean"):
        patch_model(model, **given)
    patch_model(model, image_mean=MEAN, image_std=STD)
    try:
        with raises_naming("image_mean"):
            certify_model(model, images01, n=4, **given)  # a patched model must not ignore it either
        with raises_naming("image_mean"):
            fs_mllm.attacks.image_features(model, images01, **given)
    finally:
        fs_mllm.unpatch_model(model)


def test_bad_radius(llava):
    model, images01 = llava
    for radius in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with raises_naming("radius"):
            certify_model(model, images01, n=4, radius=radius, sigma=0.25, image_mean=MEAN, image_std=STD)


def test_patch_model_rejects_non_models_and_configs(llava):
    model, _ = llava
    with raises_naming("model"):
        patch_model("llava")
    with raises_naming("config"):
        patch_model(model, config={"sigma": 0.25}, image_mean=MEAN, image_std=STD)
    with raises_naming("model"):
        fs_mllm.get_fs_state(model)
    for entry in (fs_mllm.unpatch_model, fs_mllm.is_patched, fs_mllm.get_fs_state):
        with raises_naming("model must be a torch.nn.Module"):
            entry("llava")
    with raises_naming("model must be a torch.nn.Module"):
        certify_model("llava", torch.rand(1, 3, 8, 8), sigma=0.25)


# ---------------------------------------------------------------------------------------------
# configs from JSON: one strict loader, field types checked (bool is not a number)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, data, field", [
    (GSBConfig, {"feature_dim": 8, "use_denoiser": "false"}, "use_denoiser"),
    (GSBConfig, {"feature_dim": 8, "sigma_max": True}, "sigma_max"),
    (GSBConfig, {"feature_dim": 8.0}, "feature_dim"),
    (GSBConfig, {"feature_dim": True}, "feature_dim"),
    (GSBConfig, {"feature_dim": 8, "image_size": "32"}, "image_size"),
    (GSBConfig, {"feature_dim": 8, "extra": []}, "extra"),
    (GSBConfig, {"feature_dim": 8, "encoder_id": 5}, "encoder_id"),
    (GSBConfig, {"sigma_max": 0.5}, "feature_dim"),
    (FSConfig, {"sigma": "0.25"}, "sigma"),
    (FSConfig, {"n_samples": 8.0}, "n_samples"),
    (FSConfig, {"seed": False}, "seed"),
    (FSConfig, {"chunk_size": "4"}, "chunk_size"),
    (FSConfig, {"normalize": None}, "normalize"),
    (CertifyConfig, {"n": 100.0}, "n"),
    (CertifyConfig, {"alpha": "0.01"}, "alpha"),
])
def test_config_from_dict_checks_types(cls, data, field):
    with raises_naming(field):
        cls.from_dict(data)


def test_config_from_dict_accepts_ints_for_floats_and_null_for_optional():
    assert FSConfig.from_dict({"sigma": 1, "chunk_size": None}).sigma == 1.0
    assert GSBConfig.from_dict({"feature_dim": 8, "sigma_min": 0.1, "sigma_max": 1, "image_size": None}).sigma_max == 1.0


def test_config_from_dict_needs_a_dict():
    with raises_naming("FSConfig"):
        FSConfig.from_dict([0.25])


# ---------------------------------------------------------------------------------------------
# booster folders: a ValueError naming the file and what is wrong
# ---------------------------------------------------------------------------------------------

def _saved_booster(folder):
    config = GSBConfig(feature_dim=8, denoiser_channels=4, denoiser_depth=2, mapper_hidden=8, mapper_layers=1, sigma_embed_dim=4)
    GaussianSmoothnessBooster(config).save_pretrained(folder)
    return folder


BAD_BOOSTER_FOLDERS = {
    "json_list": (CONFIG_NAME, lambda path: path.write_text("[1, 2]"), "JSON object"),
    "truncated_json": (CONFIG_NAME, lambda path: path.write_text(path.read_text()[:40]), "not valid JSON"),
    "non_utf8": (CONFIG_NAME, lambda path: path.write_bytes(b'{"feature_dim": 8, "encoder_id": "\xff\xfe"}'), "UTF-8"),
    "wrong_field_type": (CONFIG_NAME, lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "use_denoiser": "false"})),
                         "use_denoiser"),
    "unknown_field": (CONFIG_NAME, lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "sigmax": 1})), "sigmax"),
    "missing_field": (CONFIG_NAME, lambda path: path.write_text(json.dumps({"sigma_max": 0.5})), "feature_dim"),
    "truncated_weights": (WEIGHTS_NAME, lambda path: path.write_bytes(path.read_bytes()[:100]), "safetensors"),
    "empty_weights": (WEIGHTS_NAME, lambda path: path.write_bytes(b""), "safetensors"),
    "weights_of_another_config": (CONFIG_NAME, lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "mapper_hidden": 16})),
                                  "do not match"),
}


@pytest.mark.parametrize("case", sorted(BAD_BOOSTER_FOLDERS))
def test_bad_booster_folder_names_the_file(tmp_path, case):
    filename, damage, what = BAD_BOOSTER_FOLDERS[case]
    folder = _saved_booster(tmp_path / "booster")
    damage(folder / filename)
    with pytest.raises(ValueError, match=re.escape(filename)) as error:
        GaussianSmoothnessBooster.from_pretrained(folder)
    assert what in str(error.value)


def test_missing_booster_folder(tmp_path):
    with raises_naming("directory"):
        GaussianSmoothnessBooster.from_pretrained(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# model folders load safetensors only (never pickle)
# ---------------------------------------------------------------------------------------------

def test_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    from fs_mllm.models.loading import load_model

    model, _ = build("llava")
    model.save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
        weights.unlink()
    assert (tmp_path / "pytorch_model.bin").is_file() and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ValueError, match=r"safetensors") as error:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(error.value) and "pickle" in str(error.value)


def test_every_model_from_pretrained_in_the_package_asks_for_safetensors():
    """A static check: in fs_mllm every weights loader goes through load_safetensors_model (fs_mllm.hub.io;
    configs, tokenizers, processors, boosters and GGUF files are not pickle)."""
    from pathlib import Path

    import fs_mllm

    allowed = ("Config", "Tokenizer", "Processor", "gguf_file", "use_safetensors=True",
               "GaussianSmoothnessBooster.from_pretrained", "HubSurrogate.from_pretrained", "fs_mllm.from_pretrained(")
    for path in Path(fs_mllm.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ".from_pretrained(" in line and not any(word in line for word in allowed):
                raise AssertionError(f"{path.name}:{number} loads weights without load_safetensors_model: {line.strip()}")

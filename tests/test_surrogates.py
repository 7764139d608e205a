"""Surrogate encoders of the transfer protocol (fs_mllm.surrogates): built-in names, M-Attack's ensemble by name,
and any transformers encoder by Hub id or folder, tested offline with tiny random CLIP encoders saved to a folder
and to a pre-populated HF cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

from fs_mllm.attacks import AttackConfig, attack, feature_cosine
from fs_mllm.surrogates import (
    M_ATTACK_SURROGATES, HubSurrogate, check_surrogates, expand_surrogates, surrogate_encoder,
)
from fs_mllm.testing import build_llava

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _vision(size: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=size, patch_size=8, projection_dim=16)


def save_encoder(folder, dual: bool = True, size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    if dual:
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              vocab_size=99, projection_dim=16)
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=_vision(size).to_dict(), projection_dim=16))
    else:
        model = CLIPVisionModel(_vision(size))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD,
                                                                "image_processor_type": "CLIPImageProcessor"}))
    return model


def test_a_dual_encoder_folder_gives_its_projected_image_embedding_at_its_resolution(tmp_path):
    reference = save_encoder(tmp_path / "clip", size=32).eval()
    encoder = surrogate_encoder(str(tmp_path / "clip"))
    assert isinstance(encoder, HubSurrogate) and not any(p.requires_grad for p in encoder.parameters())
    images = torch.rand(2, 3, 48, 48, requires_grad=True)  # another resolution than the encoder's 32 px
    features = encoder(images)
    assert features.shape == (2, 1, 16)  # (B, T=1, projection_dim)
    resized = torch.nn.functional.interpolate(images.detach(), size=(32, 32), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = reference.get_image_features(pixel_values=(resized - mean) / std)
    expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(features[:, 0].detach(), expected)
    features.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # differentiable in the pixels


def test_a_vision_model_gives_its_pooled_output(tmp_path):
    save_encoder(tmp_path / "vision", dual=False)
    assert surrogate_encoder(str(tmp_path / "vision"))(torch.rand(3, 3, 32, 32)).shape == (3, 1, 32)


def test_a_hub_id_loads_offline_from_the_hf_cache(tmp_path, monkeypatch):
    from fs_mllm.models.hf_cache import cache_snapshot

    save_encoder(tmp_path / "clip")
    cache = tmp_path / "cache"
    cache_snapshot(tmp_path / "clip", "someone/tiny-clip", cache_dir=cache)
    script = ("import torch; from fs_mllm.surrogates import surrogate_encoder; "
              "print(tuple(surrogate_encoder('someone/tiny-clip')(torch.rand(1, 3, 32, 32)).shape))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 1, 16)"


def test_names_are_checked_before_any_crafting(tmp_path):
    assert expand_surrogates(["model", "m-attack"]) == ["model", *M_ATTACK_SURROGATES]
    assert expand_surrogates(None) is None
    with pytest.raises(ValueError, match="write \\['dinov2'\\]"):
        expand_surrogates("dinov2")
    with pytest.raises(ValueError, match="empty name"):
        expand_surrogates(["dinov2", " "])
    with pytest.raises(ValueError, match="'no-such-encoder' is neither built in .* preprocessor_config.json"):
        check_surrogates(["dinov2", "no-such-encoder"])
    (tmp_path / "no-processor").mkdir()
    save_encoder(tmp_path / "no-processor")
    (tmp_path / "no-processor" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no-processor"):
        check_surrogates([str(tmp_path / "no-processor")])
    with pytest.raises(ValueError, match="not one encoder"):
        surrogate_encoder("m-attack")


def test_pickle_weights_are_refused(tmp_path):
    model = save_encoder(tmp_path / "pickled")
    for weights in (tmp_path / "pickled").glob("model*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only, never pickle"):
        surrogate_encoder(str(tmp_path / "pickled"))


def test_a_transfer_attack_on_an_ensemble_of_folders_moves_their_features(tmp_path):
    """Crafted on two independently initialised encoders (an ensemble by folder name), never on the model: the
    attack lowers both surrogates' feature cosine, and the images are replayable on the model."""
    for seed in (0, 1):
        save_encoder(tmp_path / f"clip{seed}", seed=seed)
    names = [str(tmp_path / "clip0"), str(tmp_path / "clip1")]
    model, _ = build_llava(batch=2)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    config = AttackConfig(norm="linf", eps=16 / 255, steps=10, objective="feature", protocol="transfer", seed=0)
    result = attack(model, None, images, None, config, image_mean=MEAN, image_std=STD, surrogates=names)
    assert result.adv_images.shape == images.shape
    assert (result.adv_images - images).abs().max() <= 16 / 255 + 1e-6
    noise = (images + torch.rand(images.shape, generator=torch.Generator().manual_seed(4)).sub(0.5).sign() * 16 / 255).clamp(0, 1)
    crafted_mean = torch.zeros(2)
    for name in names:
        encoder = surrogate_encoder(name)
        with torch.no_grad():
            crafted, control = (feature_cosine(encoder(x), encoder(images)) for x in (result.adv_images, noise))
        assert (control > 0.99).all() and (crafted < control).all(), (name, crafted, control)
        crafted_mean += crafted / len(names)
    # the ensemble's objective (M-Attack's: the mean cosine) is far below what noise of the budget does; the
    # encoder with the larger gradients takes most of it (here clip0 ~0.6-0.75, clip1 ~0.99)
    assert (crafted_mean < 0.9).all(), crafted_mean


def test_gradient_weighting_keeps_one_encoder_from_taking_the_whole_step(tmp_path):
    """The mean-cosine ensemble above is dominated by the encoder with the larger gradients (clip0); scaling each
    member's gradient to the same norm per image moves the other one (clip1) too, at the same budget and steps.
    With one encoder the weighting changes nothing, and the loss an attack reports is the mean cosine either way."""
    for seed in (0, 1):
        save_encoder(tmp_path / f"clip{seed}", seed=seed)
    names = [str(tmp_path / "clip0"), str(tmp_path / "clip1")]
    model, _ = build_llava(batch=2)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cosines = {}
    for weighting in ("mean", "gradient"):
        config = AttackConfig(norm="linf", eps=16 / 255, steps=10, objective="feature", protocol="transfer", seed=0,
                              ensemble_weighting=weighting)
        adv = attack(model, None, images, None, config, image_mean=MEAN, image_std=STD, surrogates=names).adv_images
        with torch.no_grad():
            cosines[weighting] = torch.stack([feature_cosine(surrogate_encoder(n)(adv), surrogate_encoder(n)(images))
                                              for n in names])  # (members, images)
    # the weaker member: the mean leaves it near 1, the balanced ensemble pulls it clearly lower on every image
    assert (cosines["mean"][1] > 0.97).all(), cosines
    assert (cosines["gradient"][1] < cosines["mean"][1] - 0.05).all(), cosines
    # the worst-attacked member of the ensemble is better attacked
    assert (cosines["gradient"].max(0).values < cosines["mean"].max(0).values).all(), cosines
    single = [AttackConfig(norm="linf", eps=16 / 255, steps=3, objective="feature", protocol="transfer", seed=0,
                           ensemble_weighting=w) for w in ("mean", "gradient")]
    one = [attack(model, None, images, None, c, image_mean=MEAN, image_std=STD, surrogates=names[:1]).adv_images for c in single]
    assert torch.equal(one[0], one[1])
    from fs_mllm.attacks import make_objective

    objective, _ = make_objective(model, None, images, None, config, image_mean=MEAN, image_std=STD, surrogates=names)
    with torch.no_grad():
        reported = objective(images)
    mean_cosine = sum(feature_cosine(surrogate_encoder(n)(images.clone().requires_grad_(True)), surrogate_encoder(n)(images))
                      for n in names) / 2
    assert torch.allclose(objective(images.clone().requires_grad_(True)), reported) and torch.allclose(reported, mean_cosine)
    with pytest.raises(ValueError, match="ensemble_weighting"):
        AttackConfig(objective="untargeted", ensemble_weighting="gradient")
    with pytest.raises(ValueError, match="ensemble_weighting must be one of"):
        AttackConfig(ensemble_weighting="max")


def test_dinov2_at_another_resolution_and_pooling():
    encoder = surrogate_encoder("dinov2-cls112")
    assert encoder.size == 112
    assert encoder(torch.rand(1, 3, 64, 64)).shape == (1, 1, 384)


def test_the_resolution_is_the_processors_and_rows_of_images_keep_their_shape(tmp_path):
    """A processor that crops to 24 px feeds a 32 px config at 24 (Hub DINOv2: config 518, crop 224); (B, N, 3, H, W)
    images give (B, N, D)."""
    from fs_mllm.image_io import processor_size as _processor_size

    assert _processor_size({"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}) == 224
    assert _processor_size({"size": {"shortest_edge": 256}}) == 256 and _processor_size({}) is None
    save_encoder(tmp_path / "clip", size=32)
    processor = json.loads((tmp_path / "clip" / "preprocessor_config.json").read_text())
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({**processor, "crop_size": 24}))
    CLIPModel.from_pretrained(tmp_path / "clip")  # the folder is whole
    encoder = surrogate_encoder(str(tmp_path / "clip"))
    assert encoder.size == 24
    assert encoder(torch.rand(2, 3, 3, 40, 40)).shape == (2, 3, 16)


# ---------------------------------------------------------------------------------------------
# the shipped surrogates trained on the synthetic task (fs_mllm.surrogate_training)
# ---------------------------------------------------------------------------------------------

def test_the_synthetic_ensemble_is_three_shipped_encoders_of_other_architectures():
    from fs_mllm.surrogate_training import SHIPPED_SURROGATES, SPECS
    from fs_mllm.surrogates import SYNTHETIC_SURROGATES

    assert expand_surrogates(["synthetic"]) == list(SYNTHETIC_SURROGATES) == [spec.name for spec in SPECS]
    assert check_surrogates(["synthetic", "dinov2"]) == [*SYNTHETIC_SURROGATES, "dinov2"]  # built in: no Hub lookup
    # other architectures than each other's (block type, widths, depths) and other seeds
    assert len({(spec.layer_type, spec.widths, spec.depths) for spec in SPECS}) == 3 and len({spec.seed for spec in SPECS}) == 3
    for name in SYNTHETIC_SURROGATES:
        folder = SHIPPED_SURROGATES / name
        # transformers folders of safetensors and JSON only (no pickle), with the record of their training
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                                            "training.json"], name
        record = json.loads((folder / "training.json").read_text())
        # trained, not random: the held-out synthetic scenes' colours and objects are read far above chance (1/6, 1/13)
        assert record["heldout_accuracy"]["color"] > 0.9 and record["heldout_accuracy"]["object"] > 0.5, record


@pytest.mark.parametrize("name", ["synthetic-resnet-a", "synthetic-resnet-b", "synthetic-resnet-c"])
def test_a_synthetic_surrogate_is_a_differentiable_image_embedding(name):
    encoder = surrogate_encoder(name)
    images = torch.rand(2, 3, 96, 96, requires_grad=True)  # resized to its 112 px
    features = encoder(images)
    assert features.shape[:2] == (2, 1) and torch.isfinite(features).all()
    features.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen: an attack never trains it


def test_training_a_surrogate_saves_a_folder_the_transfer_attack_loads(tmp_path):
    from fs_mllm.surrogate_training import SurrogateSpec, train_surrogate

    spec = SurrogateSpec("tiny-resnet", seed=3, widths=(8, 16), depths=(1, 1), train_images=64, epochs=1, batch_size=32)
    record = train_surrogate(spec, tmp_path, progress=False)
    assert set(record["heldout_accuracy"]) == {"object", "color", "position", "count"} and record["parameters"] > 0
    encoder = HubSurrogate.from_pretrained(str(tmp_path / "tiny-resnet"))
    assert encoder.size == 112 and encoder(torch.rand(1, 3, 112, 112)).shape == (1, 1, 16)  # the pooled map, flattened
    with pytest.raises(ValueError, match="layer_type must be one of"):
        SurrogateSpec("x", seed=0, layer_type="vit")
    with pytest.raises(ValueError, match="widths and depths must be"):
        SurrogateSpec("x", seed=0, widths=(8, 16), depths=(1,))
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        SurrogateSpec("x", seed=0, epochs=0)

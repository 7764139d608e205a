"""The one photo loader: every caller (synthetic backgrounds, booster photos, offline eval set) sees the same pixels."""

import numpy as np
import pytest

from fs_mllm import image_io
from fs_mllm.evaluation.datasets import load_offline_photo
from fs_mllm.booster.data import offline_photo as booster_photo
from fs_mllm.synthetic import _background


@pytest.mark.parametrize("name, source", [
    ("astronaut", {"package": "skimage", "name": "astronaut"}),
    ("china", {"package": "sklearn", "name": "china.jpg"}),
    ("grace_hopper", {"package": "matplotlib", "name": "grace_hopper.jpg"}),
    ("stereo_motorcycle_left", {"package": "skimage", "name": "stereo_motorcycle", "index": 0}),
    ("horse", {"package": "skimage", "name": "horse"}),
])
def test_every_caller_gets_the_same_photo(name, source):
    photo = image_io.offline_photo(name)
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[-1] == 3
    np.testing.assert_array_equal(np.asarray(load_offline_photo(source)), photo)
    np.testing.assert_array_equal(booster_photo(name), photo.astype(np.float32) / 255)
    if not name.endswith("_left"):
        np.testing.assert_array_equal(_background(name), photo)


def test_stereo_views_and_binary_photos():
    left, right = image_io.offline_photo("stereo_motorcycle_left"), image_io.offline_photo("stereo_motorcycle_right")
    assert left.shape == right.shape and not np.array_equal(left, right)
    np.testing.assert_array_equal(image_io.offline_photo("stereo_motorcycle"), left)
    assert set(np.unique(image_io.offline_photo("horse"))) <= {0, 255}
    assert image_io.offline_photo("logo").shape[-1] == 3  # alpha dropped


def test_unknown_photo_or_package_is_a_clear_error():
    with pytest.raises(ValueError, match="name: skimage.data has no photo 'nope'"):
        image_io.offline_photo("nope")
    with pytest.raises(ValueError, match="package: unknown photo package 'pypi'"):
        image_io.offline_photo("astronaut", package="pypi")
    with pytest.raises(ValueError, match="source: unknown package"):
        load_offline_photo({"package": "pypi", "name": "x"})

"""Images in and out of [0,1] tensors: the one place that knows how a photo is found offline and how a
PIL/array image becomes model pixels (the synthetic backgrounds, the booster's photos and the offline
eval set all load their photos here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "image_paths", "offline_photo", "processor_size", "rgb", "to_float_rgb", "to_tensor01"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
"""What a folder of images may hold (``--images`` of every command)."""

# Photos that ship inside installed packages (DESIGN section 7), by the short names the project uses.
# Any other name is a scikit-image ``skimage.data`` loader (e.g. "astronaut", "coins").
SKLEARN_PHOTOS = ("china", "flower")
MATPLOTLIB_PHOTOS = {"grace_hopper": "grace_hopper.jpg", "mpl_logo2": "logo2.png",
                     "mpl_minduka": "Minduka_Present_Blue_Pack.png"}
PHOTO_PACKAGES = ("skimage", "sklearn", "matplotlib")


def offline_photo(name: str, package: Optional[str] = None, index: Optional[int] = None) -> np.ndarray:
    """A real photo that ships with scikit-image / scikit-learn / matplotlib, as (H, W, 3) uint8.

    ``name`` is a short name ("astronaut", "china", "grace_hopper", "stereo_motorcycle_left"), or with
    ``package`` the package's own name for it ("china.jpg" in sklearn, a sample-data file in matplotlib).
    Loaders returning several images (stereo pairs) take ``index`` (default 0, the left view); grey and
    binary photos become three equal channels, an alpha channel is dropped.
    """
    if package is None:
        package = "sklearn" if name in SKLEARN_PHOTOS else "matplotlib" if name in MATPLOTLIB_PHOTOS else "skimage"
    if package not in PHOTO_PACKAGES:
        raise ValueError(f"package: unknown photo package {package!r} (expected one of {PHOTO_PACKAGES})")
    if package == "sklearn":
        array = _sklearn_sample_image(name if name.endswith(".jpg") else f"{name}.jpg")
    elif package == "matplotlib":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(MATPLOTLIB_PHOTOS.get(name, name)) as handle:
            array = np.asarray(Image.open(handle).convert("RGB"))
    else:
        import skimage.data

        for side, view in (("_left", 0), ("_right", 1)):
            if name.endswith(side) and index is None:
                name, index = name[: -len(side)], view
        loader = getattr(skimage.data, name, None)
        if not callable(loader):
            raise ValueError(f"name: skimage.data has no photo {name!r}")
        array = loader()
        if isinstance(array, tuple):
            array = array[index or 0]
    return to_uint8_rgb(array)


def _sklearn_sample_image(filename: str) -> np.ndarray:
    """``sklearn.datasets.load_sample_image(filename)``, read as it reads it (PIL, ``np.asarray``) from the file it
    ships, without importing scikit-learn: ``import sklearn.datasets`` (scipy.stats with it) costs every process
    that shows a photo over a second. Another layout of the package falls back to scikit-learn's loader."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    folder = Path(spec.origin).parent / "datasets" / "images" if spec and spec.origin else None
    path = folder / filename if folder is not None and Path(filename).name == filename else None
    if path is None or not path.is_file():  # scikit-learn's own loader: its photo, or its error for another name
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)
    with open(path, "rb") as handle:
        return np.asarray(Image.open(handle))


def rgb(image: Image.Image) -> Image.Image:
    """A PIL image as 8-bit RGB, high-bit-depth greys scaled rather than clipped: Pillow's convert("RGB")
    clips a 16-bit PNG's values at 255, which turns the picture almost white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit PNG / TIFF greys (Pillow opens them as I or I;16)
        array = np.asarray(image, dtype=np.float64) / 65535.0
    elif image.mode == "F":  # float images: [0, 1] or [0, 255]
        array = np.asarray(image, dtype=np.float64)
        array = array / 255.0 if np.nanmax(array) > 1.0 else array
    else:
        return image.convert("RGB")
    if not np.isfinite(array).all():
        raise ValueError("image: a float image holds NaN or Inf")
    grey = Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    return grey.convert("RGB")


def to_uint8_rgb(array: Any) -> np.ndarray:
    """(H, W), (H, W, 3|4) bool/uint8 -> contiguous (H, W, 3) uint8 (bool True -> 255)."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"image: expected a uint8 or bool photo, got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def to_float_rgb(image: Any) -> np.ndarray:
    """Any photo array (H,W), (H,W,3|4), bool/uint8/float, or a PIL image -> float32 (H, W, 3) in [0,1]."""
    array = np.asarray(rgb(image)) if isinstance(image, Image.Image) else np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
        if array.max() > 1.0:
            array = array / 255.0
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    return np.clip(array[..., :3], 0.0, 1.0)


def to_tensor01(image: Any, size: int) -> torch.Tensor:
    """A PIL/array image as a (3, size, size) float tensor in [0,1] (bilinear, antialiased)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    array = np.asarray(rgb(image), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1)


def image_paths(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (checked before any model loads)."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return paths


def processor_size(processor: Any) -> Optional[int]:
    """The square side a processor feeds its model (``crop_size``, else ``size``), or None where it states no
    square. ``processor`` is a processor, an image processor or a preprocessor_config.json dict: Hub DINOv2
    configs say 518 while their processors crop to 224, so the processor is what counts."""
    image_processor = getattr(processor, "image_processor", processor)
    for key in ("crop_size", "size"):
        value = image_processor.get(key) if isinstance(image_processor, dict) else getattr(image_processor, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value) and value > 0:
            return int(value)
        if value is not None and not isinstance(value, (int, float, str)):
            value = dict(value)
            side = value.get("shortest_edge")
            if value.get("height") is not None and value.get("height") == value.get("width"):
                side = value["height"]
            if isinstance(side, int):
                return side
    return None

"""The booster's training images: the offline photos (DESIGN section 7: held-out ones are never trained on), image
folders and ``datasets`` image datasets, and the seeded random crops every training run draws from."""


from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.nn import functional as F

from .. import image_io
from ..config import SEED_LIMIT
from ..image_io import to_float_rgb


# Real photos available offline (DESIGN section 7). Held-out photos are never used for training.
HELDOUT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "china", "flower", "grace_hopper")
TRAIN_PHOTOS = (
    "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle_left", "stereo_motorcycle_right",
    "colorwheel", "logo", "camera", "brick", "grass", "gravel", "moon", "clock", "coins", "text", "page", "cell",
    "mpl_logo2", "mpl_minduka",
)



def offline_photo(name: str) -> np.ndarray:
    """One of the real photos that ship with scikit-image / scikit-learn / matplotlib, as (H, W, 3) float."""
    return to_float_rgb(image_io.offline_photo(name))


def load_image_folder(path: Union[str, os.PathLike]) -> list[np.ndarray]:
    """All images (png/jpg/jpeg/bmp/webp/tif) in a folder, recursively, as float RGB arrays."""
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
    if not files:
        raise ValueError(f"image folder {str(folder)!r} holds no images")
    return [to_float_rgb(Image.open(p)) for p in files]


def load_image_dataset(name_or_path: str, split: str = "train", image_column: str = "image", limit: Optional[int] = None) -> list[np.ndarray]:
    """Images of a ``datasets`` dataset (local path or cached name) as float RGB arrays."""
    import datasets

    data = datasets.load_dataset(name_or_path, split=split) if not os.path.isdir(name_or_path) else datasets.load_from_disk(name_or_path)
    if hasattr(data, "keys") and split in data:
        data = data[split]
    if image_column not in data.column_names:
        raise ValueError(f"image_column {image_column!r} not in dataset columns {data.column_names}")
    count = len(data) if limit is None else min(limit, len(data))
    return [to_float_rgb(data[i][image_column]) for i in range(count)]


def resize_square(image: np.ndarray, size: int) -> torch.Tensor:
    """Centre-crop to a square and resize (bicubic, antialiased) to (3, size, size) in [0,1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    h, w = tensor.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    tensor = tensor[:, top:top + side, left:left + side]
    out = F.interpolate(tensor[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(0, 1)


def heldout_images(size: int, names: Sequence[str] = HELDOUT_PHOTOS) -> torch.Tensor:
    """The held-out real photos, centre-cropped and resized: (len(names), 3, size, size)."""
    return torch.stack([resize_square(offline_photo(n), size) for n in names])


def seeded_generator(seed: int, device: Any = None) -> torch.Generator:
    """A generator for a derived seed (seed * k + step ...), folded into torch's range so a large user seed
    cannot overflow manual_seed; identical to manual_seed(seed) for every seed below 2**63."""
    return torch.Generator(device=device).manual_seed(seed % SEED_LIMIT)


class RandomCropDataset(torch.utils.data.Dataset):
    """Seeded random crops (scale 0.15-1 of the short side), flips and colour jitter of a list of images.

    Item i is a pure function of (seed, i), so a resumed run (offset) continues with fresh crops and
    accelerate can shard the indices over processes.
    """

    def __init__(self, images: Sequence[np.ndarray], size: int, length: int, seed: int = 0, offset: int = 0, augment: bool = True) -> None:
        if not images:
            raise ValueError("images must hold at least one image")
        self.images = [torch.from_numpy(np.ascontiguousarray(to_float_rgb(im))).permute(2, 0, 1) for im in images]
        self.size, self.length, self.seed, self.offset, self.augment = size, length, seed, offset, augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        g = seeded_generator(self.seed * 1_000_003 + self.offset + index)
        image = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
        h, w = image.shape[1:]
        short = min(h, w)
        scale = float(torch.empty(1).uniform_(0.15, 1.0, generator=g)) if self.augment else 1.0
        side = max(8, int(short * scale))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = image[:, top:top + side, left:left + side]
        crop = F.interpolate(crop[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        if self.augment:
            if torch.rand(1, generator=g) < 0.5:
                crop = crop.flip(-1)
            brightness, contrast, saturation = (torch.empty(3).uniform_(0.7, 1.3, generator=g)).tolist()
            gray = crop.mean(0, keepdim=True)
            crop = gray + (crop - gray) * saturation
            crop = (crop - crop.mean()) * contrast + crop.mean() * brightness
        return crop.clamp(0, 1)

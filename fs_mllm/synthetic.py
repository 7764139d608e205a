"""Deterministic synthetic VQA / captioning data drawn on real photos (offline, no downloads).

Why: the project needs a task on which a small real MLLM can be trained and evaluated offline,
with exact ground truth. Each image shows either a group of identical shapes (shape, colour,
count, position) or one rendered word (word, colour, position), composited on a crop of a real
photo from scikit-image / scikit-learn / matplotlib. Train and held-out splits use *disjoint*
background photos and disjoint seed streams, so held-out examples are really unseen.

Deterministic for one set of libraries: the pixels come from numpy's random streams, Pillow's drawing,
resizing and FreeType text, and the photo packages' decoders, so other versions of those may move a few
pixels (a GPU machine with other versions drew images that hash differently from this CPU's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .answers import answers_match, normalize_answer  # noqa: F401  (public here too: the task is scored with them)
from .image_io import offline_photo

__all__ = [
    "SHAPES",
    "COLORS",
    "COUNTS",
    "POSITIONS",
    "WORDS",
    "TRAIN_BACKGROUNDS",
    "HELDOUT_BACKGROUNDS",
    "SyntheticExample",
    "make_example",
    "make_dataset",
    "normalize_answer",
    "vqa_match",
]

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (230, 25, 25),
    "green": (20, 190, 40),
    "blue": (30, 60, 235),
    "yellow": (250, 230, 20),
    "purple": (150, 40, 200),
    "white": (250, 250, 250),
}
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
WORDS = ("cat", "sun", "tree", "fish", "bird", "moon", "star", "book", "cake", "ship")

# Disjoint photo sets: the held-out split never shows a training background.
TRAIN_BACKGROUNDS = (
    "astronaut", "chelsea", "camera", "stereo_motorcycle", "hubble_deep_field", "retina",
    "immunohistochemistry", "coins", "moon", "page", "clock", "brick", "grass", "gravel",
    "colorwheel", "cell", "china",
)
HELDOUT_BACKGROUNDS = ("coffee", "rocket", "flower", "grace_hopper", "text")
_SPLITS = {"train": 0, "heldout": 1}

_SHAPE_QUESTIONS = {
    "shape": ("What shape is shown?", "What kind of shape is in the image?"),
    "color": ("What color are the shapes?", "What is the color of the shapes?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "position": ("Where are the shapes: left, right, top or bottom?", "On which side are the shapes?"),
}
_WORD_QUESTIONS = {
    "word": ("What word is written?", "What does the text say?"),
    "color": ("What color is the text?", "What is the color of the word?"),
    "position": ("Where is the text: left, right, top or bottom?", "On which side is the word?"),
}


@dataclass
class SyntheticExample:
    """One image with its ground truth: a caption and (question, accepted answers) pairs."""

    image: Image.Image
    caption: str
    qa: list[tuple[str, list[str]]]
    meta: dict = field(default_factory=dict)


@lru_cache(maxsize=None)
def _background(name: str) -> np.ndarray:
    """One real photo as uint8 RGB (cached: several are decoded from disk)."""
    return offline_photo(name)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")
    return ImageFont.truetype(path, size)


def _crop_background(rng: np.random.Generator, name: str, size: int) -> Image.Image:
    arr = _background(name)
    h, w = arr.shape[:2]
    side = int(min(h, w) * rng.uniform(0.6, 1.0))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    img = Image.fromarray(arr[y0 : y0 + side, x0 : x0 + side]).resize((size, size), Image.BILINEAR)
    # Soften the photo a little so the drawn objects stay the salient content.
    return Image.blend(img, Image.new("RGB", img.size, (128, 128, 128)), float(rng.uniform(0.2, 0.45)))


def _region(position: str, size: int) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) for a half of the canvas, kept away from the other axis' edges."""
    m, half = int(0.06 * size), size // 2
    if position == "left":
        return m, int(0.18 * size), half - m // 2, int(0.82 * size)
    if position == "right":
        return half + m // 2, int(0.18 * size), size - m, int(0.82 * size)
    if position == "top":
        return int(0.18 * size), m, int(0.82 * size), half - m // 2
    return int(0.18 * size), half + m // 2, int(0.82 * size), size - m


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    outline = (0, 0, 0) if sum(color) > 450 else (255, 255, 255)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=outline, width=2)
    elif shape == "square":
        s = 0.88 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color, outline=outline, width=2)
    else:
        pts = [(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)]
        draw.polygon(pts, fill=color, outline=outline, width=2)


def _place(rng: np.random.Generator, box, n: int, r: float) -> list[tuple[float, float]]:
    """Non-overlapping centres inside box (rejection sampling, then a grid fallback)."""
    x0, y0, x1, y1 = box
    centres: list[tuple[float, float]] = []
    for _ in range(400):
        if len(centres) == n:
            return centres
        c = (rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r))
        if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > (2.3 * r) ** 2 for a, b in centres):
            centres.append(c)
    wide = (x1 - x0) >= (y1 - y0)
    return [
        ((x0 + (i + 0.5) * (x1 - x0) / n, (y0 + y1) / 2) if wide else ((x0 + x1) / 2, y0 + (i + 0.5) * (y1 - y0) / n))
        for i in range(n)
    ]


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def make_example(index: int, split: str = "train", seed: int = 0, size: int = 224) -> SyntheticExample:
    """Build example ``index`` of ``split``; identical inputs give identical outputs."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    if index < 0 or size < 56:
        raise ValueError(f"need index >= 0 and size >= 56, got index={index}, size={size}")
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    names = TRAIN_BACKGROUNDS if split == "train" else HELDOUT_BACKGROUNDS
    background = names[int(rng.integers(len(names)))]
    img = _crop_background(rng, background, size)
    draw = ImageDraw.Draw(img)
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    box = _region(position, size)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731

    if rng.uniform() < 0.7:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        count = int(rng.integers(1, 5))
        r = size * rng.uniform(0.065, 0.085)
        for cx, cy in _place(rng, box, count, r):
            _draw_shape(draw, shape, cx, cy, r, COLORS[color])
        n = COUNTS[count - 1]
        caption = f"{n} {color} {_plural(shape, count)} on the {position}"
        qa = [
            (pick(_SHAPE_QUESTIONS["shape"]), [shape, _plural(shape, 2)]),
            (pick(_SHAPE_QUESTIONS["color"]), [color]),
            (pick(_SHAPE_QUESTIONS["count"]), [n, str(count)]),
            (pick(_SHAPE_QUESTIONS["position"]), [position]),
        ]
        meta = {"kind": "shapes", "shape": shape, "count": count}
    else:
        word = WORDS[int(rng.integers(len(WORDS)))]
        font = _font(int(size * 0.16))
        x0, y0, x1, y1 = box
        tb = draw.textbbox((0, 0), word, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        tx = rng.uniform(x0, max(x0, x1 - tw))
        ty = rng.uniform(y0, max(y0, y1 - th))
        outline = (0, 0, 0) if sum(COLORS[color]) > 450 else (255, 255, 255)
        draw.text((tx - tb[0], ty - tb[1]), word, font=font, fill=COLORS[color], stroke_width=2, stroke_fill=outline)
        caption = f"the word {word} written in {color} on the {position}"
        qa = [
            (pick(_WORD_QUESTIONS["word"]), [word]),
            (pick(_WORD_QUESTIONS["color"]), [color]),
            (pick(_WORD_QUESTIONS["position"]), [position]),
        ]
        meta = {"kind": "word", "word": word}
    meta.update({"background": background, "color": color, "position": position, "split": split, "index": index})
    order = rng.permutation(len(qa))
    return SyntheticExample(image=img, caption=caption, qa=[qa[i] for i in order], meta=meta)


def make_dataset(n: int, split: str = "train", seed: int = 0, size: int = 224, start: int = 0) -> list[SyntheticExample]:
    """``n`` consecutive examples of a split (deterministic by ``seed``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_example(start + i, split=split, seed=seed, size=size) for i in range(n)]


# The synthetic task's answer matching is the project's one answer comparison (fs_mllm.answers).
vqa_match = answers_match

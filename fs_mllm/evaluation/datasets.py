"""Evaluation datasets: the shipped offline eval set and a loader that normalises other sets.

Every loader returns a :class:`datasets.Dataset` in one of two canonical shapes, so evaluation
code never branches on where the data came from:

* ``task="vqa"`` (VQAv2 shape): ``image`` (``datasets.Image()``), ``question`` (str), ``answers``
  (list of str, usually 10 human answers), ``question_id`` (int), ``image_id`` (int).
* ``task="caption"`` (COCO shape): ``image`` (``datasets.Image()``), ``captions`` (list of str),
  ``image_id`` (int).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Optional, Sequence

import datasets
from PIL import Image as PILImage

from fs_mllm.data import OFFLINE_EVAL_ANNOTATIONS
from fs_mllm.image_io import PHOTO_PACKAGES, offline_photo

__all__ = [
    "OFFLINE_EVAL_NAME",
    "SYNTHETIC_EVAL_NAME",
    "load_offline_eval",
    "load_synthetic_heldout",
    "load_offline_photo",
    "load_eval_dataset",
    "normalize_eval_columns",
    "VQA_FEATURES",
    "CAPTION_FEATURES",
]

OFFLINE_EVAL_NAME = "fs-offline-eval"
SYNTHETIC_EVAL_NAME = "fs-synthetic-heldout"
SYNTHETIC_EVAL_IMAGES = 40
_TASKS = ("vqa", "caption")

# datasets >= 4 has List; 3.x spells a variable-length list Sequence.
_List = getattr(datasets, "List", None) or datasets.Sequence

VQA_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "answers": _List(datasets.Value("string")),
    "question_id": datasets.Value("int64"),
    "image_id": datasets.Value("int64"),
})
CAPTION_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "captions": _List(datasets.Value("string")),
    "image_id": datasets.Value("int64"),
})

# Accepted source column names, first match wins.
_IMAGE_COLS = ("image", "img", "picture", "image_path", "file_name")
_QUESTION_COLS = ("question", "query")
_ANSWER_COLS = ("answers", "answer", "multiple_choice_answer", "label")
_CAPTION_COLS = ("captions", "caption", "sentences", "references", "text")
_QID_COLS = ("question_id", "qid", "id")
_IID_COLS = ("image_id", "cocoid", "img_id", "id")


def _check_task(task: str) -> str:
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    return task


def _read_annotations() -> list[dict[str, Any]]:
    with open(OFFLINE_EVAL_ANNOTATIONS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_offline_photo(source: dict[str, Any]) -> PILImage.Image:
    """Load one shipped photo as an RGB PIL image from the package that distributes it.

    ``source`` is the ``source`` field of an annotation record, e.g.
    ``{"package": "skimage", "name": "astronaut"}`` (``"index"`` picks one view of a stereo pair).
    Grey-scale and binary images are converted to RGB because multimodal processors expect three channels.
    """
    package, name = source.get("package"), source.get("name")
    if package not in PHOTO_PACKAGES:
        raise ValueError(f"source: unknown package {package!r} (expected skimage, sklearn or matplotlib)")
    return PILImage.fromarray(offline_photo(str(name), package=package, index=int(source.get("index", 0))))


def _png_bytes(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_offline_eval(task: str = "vqa") -> datasets.Dataset:
    """The shipped real-photo eval set (``"fs-offline-eval"``) in the canonical VQA or caption shape.

    Works with no network: photos come from scikit-image, scikit-learn and matplotlib, annotations
    (written for this project; see ``fs_mllm/data/offline_eval/README.md``) from the package.
    """
    _check_task(task)
    records = _read_annotations()
    # Encode each photo once (lossless PNG, fast setting); letting datasets encode PIL objects
    # would re-encode a photo for every question asked about it.
    images = {r["image_id"]: {"bytes": _png_bytes(load_offline_photo(r["source"])), "path": None} for r in records}
    if task == "caption":
        data = {
            "image": [images[r["image_id"]] for r in records],
            "captions": [list(r["captions"]) for r in records],
            "image_id": [r["image_id"] for r in records],
        }
        return datasets.Dataset.from_dict(data, features=CAPTION_FEATURES)
    rows = [(r["image_id"], q) for r in records for q in r["questions"]]
    data = {
        "image": [images[iid] for iid, _ in rows],
        "question": [q["question"] for _, q in rows],
        "answers": [list(q["answers"]) for _, q in rows],
        "question_id": [q["question_id"] for _, q in rows],
        "image_id": [iid for iid, _ in rows],
    }
    return datasets.Dataset.from_dict(data, features=VQA_FEATURES)


def _first(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    for c in candidates:
        if c in columns:
            return c
    return None


def _missing(task: str, what: str, candidates: Sequence[str], columns: Sequence[str]) -> ValueError:
    expected = {"vqa": "image, question, answers (question_id, image_id optional)",
                "caption": "image, captions (image_id optional)"}[task]
    return ValueError(
        f"dataset for task={task!r} has no {what} column (looked for {list(candidates)}); expected columns: "
        f"{expected}; found columns: {list(columns)}"
    )


def _text_list(value: Any, keys: Sequence[str], column: str) -> list[str]:
    """Turn a str / list of str / list of dicts (VQAv2 ``answer``, Karpathy ``raw``) into list[str]."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        # a columnar struct, e.g. {"answer": [...], "answer_id": [...]} from a Hub dataset
        for k in keys:
            if k in value:
                return _text_list(value[k], keys, column)
        raise ValueError(f"column {column!r}: dict entries need one of the keys {list(keys)}, got {list(value)}")
    out: list[str] = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            key = _first(list(item), keys)
            if key is None:
                raise ValueError(f"column {column!r}: dict entries need one of the keys {list(keys)}, got {list(item)}")
            out.append(str(item[key]))
        else:
            out.append(str(item))
    return out


def _ids(ds: datasets.Dataset, candidates: Sequence[str], exclude: Sequence[str] = ()) -> list[int]:
    col = _first([c for c in ds.column_names if c not in exclude], candidates)
    if col is None:
        return list(range(len(ds)))
    values = ds[col]
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        # non-numeric ids (e.g. file names): stable integer ids by first appearance
        mapping: dict[Any, int] = {}
        return [mapping.setdefault(v, len(mapping)) for v in values]


def normalize_eval_columns(ds: datasets.Dataset, task: str) -> datasets.Dataset:
    """Rename/convert a dataset's columns to the canonical VQA or caption shape (see module doc).

    Accepts e.g. ``answers`` as a list of str or VQAv2 list of ``{"answer": ...}`` dicts, a single
    ``answer`` str, and ``captions`` / ``caption`` / Karpathy-style ``sentences`` (dicts with ``raw``).
    Columns outside the canonical shape are dropped. Raises ValueError listing expected columns.
    """
    _check_task(task)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"ds must be a datasets.Dataset, got {type(ds).__name__}")
    cols = ds.column_names
    image_col = _first(cols, _IMAGE_COLS)
    if image_col is None:
        raise _missing(task, "image", _IMAGE_COLS, cols)
    out = ds.select_columns([image_col])
    if image_col != "image":
        out = out.rename_column(image_col, "image")
    if not isinstance(out.features["image"], datasets.Image):
        out = out.cast_column("image", datasets.Image())  # e.g. a column of file paths
    if task == "vqa":
        q_col = _first(cols, _QUESTION_COLS)
        if q_col is None:
            raise _missing(task, "question", _QUESTION_COLS, cols)
        a_col = _first(cols, _ANSWER_COLS)
        if a_col is None:
            raise _missing(task, "answers", _ANSWER_COLS, cols)
        answers = [_text_list(v, ("answer", "text"), a_col) for v in ds[a_col]]
        if any(len(a) == 0 for a in answers):
            raise ValueError(f"column {a_col!r}: every question needs at least one answer")
        qids = _ids(ds, _QID_COLS)
        iids = _ids(ds, _IID_COLS, exclude=("id",))
        out = out.add_column("question", [str(q) for q in ds[q_col]])
        out = out.add_column("answers", answers)
        out = out.add_column("question_id", qids)
        out = out.add_column("image_id", iids)
        return out.cast(VQA_FEATURES)
    c_col = _first(cols, _CAPTION_COLS)
    if c_col is None:
        raise _missing(task, "captions", _CAPTION_COLS, cols)
    captions = [_text_list(v, ("raw", "caption", "text", "sentence"), c_col) for v in ds[c_col]]
    if any(len(c) == 0 for c in captions):
        raise ValueError(f"column {c_col!r}: every image needs at least one reference caption")
    out = out.add_column("captions", captions)
    out = out.add_column("image_id", _ids(ds, _IID_COLS))
    return out.cast(CAPTION_FEATURES)


DEFAULT_SPLIT = "validation"  # load_eval_dataset's default: also picks the only split of a local folder


def _pick_split(obj: datasets.Dataset | datasets.DatasetDict, split: str | None, where: str) -> datasets.Dataset:
    if isinstance(obj, datasets.Dataset):  # one split saved on its own: only its name (or the default) picks it
        if split in (None, DEFAULT_SPLIT) or obj.split is None or str(obj.split) == split:  # unnamed: cannot tell
            return obj
        raise ValueError(f"split {split!r} not found in {where}, which holds one split ({obj.split or 'unnamed'}); "
                         f"leave --split at its default")
    if split is not None and split in obj:
        return obj[split]
    # one split only (imagefolder without split folders names it "train"): the default picks it, another name does not
    if len(obj) == 1 and split in (None, DEFAULT_SPLIT):
        return next(iter(obj.values()))
    raise ValueError(f"split {split!r} not found in {where}; available splits: {list(obj)}")


def _check_builtin_split(name: str, split: str | None) -> None:
    if split not in (None, DEFAULT_SPLIT):
        raise ValueError(f"split {split!r}: {name} has one split, {DEFAULT_SPLIT!r}; leave --split at its default")


def load_synthetic_heldout(task: str = "vqa", n_images: int = SYNTHETIC_EVAL_IMAGES) -> datasets.Dataset:
    """Held-out synthetic images (``"fs-synthetic-heldout"``): the task fs-mini-llava was trained on.

    Why: fs-mini-llava's projector learned only the synthetic task (``fs_mllm.synthetic``), so this is
    where its accuracy, and what smoothing and attacks do to it, can be measured; the backgrounds are
    real photos the training never used. Each accepted answer is listed 4 times, so any of them scores 1
    under the official VQA rule (min(matches / 3, 1), averaged over the leave-one-out subsets).
    """
    from fs_mllm.synthetic import make_dataset

    _check_task(task)
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    examples = make_dataset(n_images, split="heldout")
    images = [{"bytes": _png_bytes(e.image), "path": None} for e in examples]
    if task == "caption":
        return datasets.Dataset.from_dict(
            {"image": images, "captions": [[e.caption] for e in examples], "image_id": list(range(n_images))},
            features=CAPTION_FEATURES,
        )
    rows = [(i, q, answers) for i, e in enumerate(examples) for q, answers in e.qa]
    return datasets.Dataset.from_dict(
        {
            "image": [images[i] for i, _, _ in rows],
            "question": [q for _, q, _ in rows],
            "answers": [[a for a in answers for _ in range(4)] for _, _, answers in rows],
            "question_id": list(range(len(rows))),
            "image_id": [i for i, _, _ in rows],
        },
        features=VQA_FEATURES,
    )


def load_eval_dataset(name_or_path: str = OFFLINE_EVAL_NAME, task: str = "vqa", split: str | None = "validation",
                      **load_kwargs: Any) -> datasets.Dataset:
    """Load an evaluation set from anywhere and return it in the canonical shape for ``task``.

    ``name_or_path`` is ``"fs-offline-eval"`` (the shipped real-photo set, always offline),
    ``"fs-synthetic-heldout"`` (held-out synthetic images, fs-mini-llava's own task), a local folder
    (a ``save_to_disk`` dataset, or an imagefolder with ``metadata.jsonl``), or a Hub dataset id
    loaded with ``datasets.load_dataset`` (needs the Hub or its local cache). ``load_kwargs`` go to
    ``datasets.load_dataset`` (e.g. ``name=`` for a config).
    """
    _check_task(task)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a non-empty str, got {name_or_path!r}")
    if name_or_path in (OFFLINE_EVAL_NAME, SYNTHETIC_EVAL_NAME):
        _check_builtin_split(name_or_path, split)
        return load_offline_eval(task) if name_or_path == OFFLINE_EVAL_NAME else load_synthetic_heldout(task)
    if os.path.isdir(name_or_path):
        saved_markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any(os.path.exists(os.path.join(name_or_path, m)) for m in saved_markers):
            obj = datasets.load_from_disk(name_or_path)
        else:
            obj = datasets.load_dataset("imagefolder", data_dir=name_or_path, **load_kwargs)
        ds = _pick_split(obj, split, name_or_path)
    elif os.path.exists(name_or_path):
        raise ValueError(f"name_or_path {name_or_path!r} is a file; pass a folder, a Hub id or {OFFLINE_EVAL_NAME!r}")
    else:
        ds = datasets.load_dataset(name_or_path, split=split, **load_kwargs)
        ds = _pick_split(ds, split, name_or_path)
    return normalize_eval_columns(ds, task)


def read_images(folder: Optional[str], limit: Optional[int] = None) -> tuple[list, list[str]]:
    """The decoded images (PIL) and their names: a folder of images, or the project's real offline photos.

    Decoded here, before any model loads: a damaged or truncated file is named at once, not after the load."""
    from PIL import Image

    from ..image_io import image_paths

    if folder is None:
        photos = load_offline_eval("caption")
        names = [f"offline-photo-{i}" for i in photos["image_id"]]
        images = list(photos["image"])
    else:
        paths = image_paths(folder)
        names = [p.name for p in paths]
        images = []
        for path in paths[:limit]:
            try:
                image = Image.open(path)
                image.load()  # decodes now: a truncated file fails here, named, not later
                images.append(image)
            except OSError as error:  # not an image after all (or a damaged one)
                raise ValueError(f"--images: {path} cannot be read as an image ({error})") from None
    if limit is not None:
        names, images = names[:limit], images[:limit]
    return images, names


def load_images(folder: Optional[str], size: int, limit: Optional[int] = None):
    """[0,1] images (B, 3, size, size) and their names: a folder of images, or the project's real offline photos."""
    import torch

    from ..image_io import to_tensor01

    images, names = read_images(folder, limit)
    return torch.stack([to_tensor01(image, size) for image in images]), names

"""Atomic, resumable training checkpoints: safetensors weights and optimizer tensors plus JSON (no pickle).

A save writes a new copy beside the old one and swaps them with renames, so a kill at any point leaves one complete
copy, which the next run resumes from."""


from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .model import CONFIG_NAME, WEIGHTS_NAME, GaussianSmoothnessBooster


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON part (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            name = f"state.{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_OPTIM = "optimizer.safetensors"


def _checkpoint_copies(folder: Path) -> tuple[Path, Path, Path]:
    """(tmp, folder, old): the copies a save can leave, newest first (see :func:`save_checkpoint`)."""
    return folder.with_name(folder.name + ".tmp"), folder, folder.with_name(folder.name + ".old")


def _is_complete(copy: Path) -> bool:
    """The state JSON is written last, so a copy whose state parses was written completely."""
    try:
        json.loads((copy / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return False
    return all((copy / name).is_file() for name in (CHECKPOINT_OPTIM, WEIGHTS_NAME, CONFIG_NAME))


def _newest_complete_copy(folder: Path) -> Optional[Path]:
    return next((copy for copy in _checkpoint_copies(folder) if _is_complete(copy)), None)


def _settle_checkpoint(folder: Path) -> None:
    """Finish a save that a kill interrupted: the newest complete copy becomes ``folder``, the rest go.

    Nothing complete is deleted before the newest copy is in place, so a kill here is recoverable too.
    """
    tmp, _, old = _checkpoint_copies(folder)
    newest = _newest_complete_copy(folder)
    if newest is not None and newest != folder:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(newest, folder)
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)


def save_checkpoint(folder: Union[str, os.PathLike], booster: GaussianSmoothnessBooster, optimizer: torch.optim.Optimizer, step: int, stage: str, history: list, seconds: float = 0.0,
                    train_config: Optional[dict] = None) -> Path:
    """Weights + optimizer state (safetensors) + step/stage/history/seconds/train config (JSON), crash-safe.

    Writes ``folder.tmp`` completely (state JSON last), renames folder -> folder.old and folder.tmp ->
    folder, then deletes folder.old. A kill at any point leaves at least one complete copy, which
    :func:`load_checkpoint_state` resumes from and the next save settles.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp, _, old = _checkpoint_copies(folder)
    _settle_checkpoint(folder)
    booster.save_pretrained(tmp)
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(tmp / CHECKPOINT_OPTIM))
    (tmp / CHECKPOINT_STATE).write_text(json.dumps({"step": step, "stage": stage, "seconds": seconds, "optimizer": meta, "history": history,
                                                   "train_config": train_config}, indent=1))
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_checkpoint_state(folder: Union[str, os.PathLike]) -> Optional[dict]:
    """The JSON state and optimizer tensors of the newest complete checkpoint copy, or None when there is none.

    ``state["path"]`` is the copy read (``folder`` itself, or its ``.tmp``/``.old`` sibling after a kill
    during a save). Read-only, so every process of a distributed run can call it.
    """
    from safetensors.torch import load_file

    copy = _newest_complete_copy(Path(folder))
    if copy is None:
        return None
    state = json.loads((copy / CHECKPOINT_STATE).read_text())
    state["optimizer_tensors"] = load_file(str(copy / CHECKPOINT_OPTIM))
    state["path"] = str(copy)
    return state

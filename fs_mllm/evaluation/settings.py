"""Evaluation settings: what decides the content of a result row, its command line, and the folder check.

Why its own module: ``settings.json`` is the contract between a run and its resume. A rerun with other
settings into a folder that holds rows is refused (:class:`SettingsMismatchError`), because rows
computed under different settings would be mixed silently in the summary; only the settings that
select *which* keys are computed (``--limit``, extra budgets) may change. The command line
(fs_mllm/commands/eval.py) builds exactly these settings, checked before any model work.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from fs_mllm.arguments import check_float, check_int
from fs_mllm.attacks import NORMS, OBJECTIVES, PROTOCOLS, AttackConfig  # one definition of each
from fs_mllm.config import COMMAND_ATTACK_STEPS, EVAL_EOT_SAMPLES, FSConfig, check_bool
from fs_mllm.defense import check_variants
from fs_mllm.results import SETTINGS_FILE, SettingsMismatchError, check_settings
from fs_mllm.models.loading import DEFAULT_MODEL
from fs_mllm.models.mini_llava import BOOSTER_DIR

__all__ = ["TASKS", "SETTINGS_FILE", "RESUME_RULE", "EvalSettings", "SettingsMismatchError", "verify_settings"]

TASKS = ("vqa", "caption")
ANSWER_TOKENS = {"vqa": 10, "caption": 24}  # tokens generated per answer unless max_new_tokens says otherwise
# Settings that may change between a run and its resume: they select *which* keys are computed, never
# what a key's row contains (a larger --limit or an extra budget just adds rows).
_EXTENSIBLE = ("limit", "attack_eps")


def _default_booster(model: str) -> str:
    """The booster fs+gsb uses when none is given: the embedded model's shipped one, or the one saved with an
    fs_mllm.save_pretrained folder / repo id; anything else must name its booster."""
    if model == DEFAULT_MODEL:
        return str(BOOSTER_DIR)
    from fs_mllm.hub import FS_CONFIG_NAME, is_saved_patch, read_saved_patch, resolve_folder

    if is_saved_patch(model):
        folder, _ = resolve_folder(model, settings_only=True)
        if read_saved_patch(folder / FS_CONFIG_NAME).booster:
            return str(folder)
    raise ValueError("variants contains 'fs+gsb' but booster is not set (a GaussianSmoothnessBooster folder), and "
                     f"model {model!r} is neither fs-mini-llava nor a saved fs_mllm folder with a booster")


@dataclass
class EvalSettings:
    """Everything that decides the content of a result row (stored as ``settings.json``).

    task: "vqa" or "caption". model: "fs-mini-llava" (the embedded offline LLaVA) or a model id/folder
    for ``AutoModelForImageTextToText``. dataset/split: for :func:`load_eval_dataset`. variants: any of
    "base", "fs", "fs+gsb" (the last needs ``booster``, a GSB folder). fs: the FSConfig of the FS variants
    (sigma, n_samples, seed, ...; stored nested in settings.json).
    attack_eps: attack budgets (> 0; empty = clean only) in [0,1] pixel space at processor resolution,
    with ``attack_norm``, ``attack_steps``, ``attack_step_size`` (None = 2.5 * eps / steps), ``objective``,
    ``target`` (targeted only) and ``eot_samples`` (noisy forwards per gradient on FS variants).
    protocol: "adaptive" (through each variant's own smoothed path) or "transfer" (the paper's protocol:
    crafted on the undefended model with the same seed for every variant, so every variant sees the same
    images); objective "feature_target" pulls the features towards the next example's image, and rows
    then record the variant's answer for that image and whether the attacked answer became it.
    crop_scale: M-Attack's random local crops (lo, hi area fraction) or None; crop_views and crop_full_view as
    in :class:`fs_mllm.attacks.AttackConfig` (crops per transfer gradient; the first view whole). certify_n > 0 certifies every FS variant's clean image with that many
    noise samples at level ``fs.alpha``. limit: first N examples only.
    """

    task: str = "vqa"
    model: str = DEFAULT_MODEL
    dataset: str = "fs-offline-eval"
    split: Optional[str] = "validation"
    variants: tuple = ("base", "fs")
    fs: FSConfig = field(default_factory=FSConfig)
    booster: Optional[str] = None
    attack_norm: str = AttackConfig.norm
    attack_eps: tuple = ()
    attack_steps: int = COMMAND_ATTACK_STEPS
    attack_step_size: Optional[float] = None
    objective: str = AttackConfig.objective
    target: Optional[str] = None
    protocol: str = AttackConfig.protocol
    crop_scale: Optional[tuple] = None
    crop_views: int = 1
    crop_full_view: bool = False
    eot_samples: int = EVAL_EOT_SAMPLES
    certify_n: int = 0
    max_new_tokens: Optional[int] = None  # None: the task's ANSWER_TOKENS (stored as the number)
    caption_prompt: str = "Describe the image in one sentence."
    limit: Optional[int] = None
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.max_new_tokens is None:
            self.max_new_tokens = ANSWER_TOKENS[self.task]
        for name in ("model", "dataset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty str, got {getattr(self, name)!r}")
        self.variants = check_variants(self.variants)
        if "fs+gsb" in self.variants and not self.booster:
            self.booster = _default_booster(self.model)
        # a local folder is stored as an absolute path, so a resume from another cwd compares equal
        if os.path.isdir(self.model):
            self.model = os.path.abspath(self.model)
        if os.path.isdir(self.dataset):
            self.dataset = os.path.abspath(self.dataset)
        if self.booster is not None:
            self.booster = os.path.abspath(os.fspath(self.booster))
        if isinstance(self.fs, Mapping):
            self.fs = FSConfig.from_dict(dict(self.fs))
        if not isinstance(self.fs, FSConfig):
            raise ValueError(f"fs must be an fs_mllm.FSConfig (the smoothing of the FS variants), got {type(self.fs).__name__}")
        if self.attack_norm not in NORMS:
            raise ValueError(f"attack_norm must be one of {NORMS}, got {self.attack_norm!r}")
        if isinstance(self.attack_eps, (int, float)):
            self.attack_eps = (self.attack_eps,)
        eps = tuple(check_float(e, "attack_eps") for e in self.attack_eps)
        if len(set(eps)) != len(eps):
            raise ValueError(f"attack_eps must not repeat a budget, got {list(eps)}")
        self.attack_eps = tuple(sorted(eps))
        self.attack_steps = check_int(self.attack_steps, "attack_steps")
        if self.attack_step_size is not None:
            self.attack_step_size = check_float(self.attack_step_size, "attack_step_size")
        self.eot_samples = check_int(self.eot_samples, "eot_samples")
        self.crop_views = check_int(self.crop_views, "crop_views")
        self.crop_full_view = check_bool(self.crop_full_view, "crop_full_view")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.crop_scale is not None:
            self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if self.objective == "targeted" and self.attack_eps and not (isinstance(self.target, str) and self.target.strip()):
            raise ValueError("objective='targeted' needs target (the string the attack makes the model say)")
        if self.attack_eps:  # every budget through the attack's own range checks, before any model work
            for eps in self.attack_eps:
                AttackConfig(norm=self.attack_norm, eps=eps, steps=self.attack_steps, objective=self.objective,
                             target_text=self.target, protocol=self.protocol, crop_scale=self.crop_scale,
                             crop_views=self.crop_views, crop_full_view=self.crop_full_view)
        if isinstance(self.certify_n, bool) or not isinstance(self.certify_n, int) or self.certify_n < 0 or self.certify_n == 1:
            raise ValueError(f"certify_n must be 0 (no certification) or an integer >= 2, got {self.certify_n!r}")
        self.max_new_tokens = check_int(self.max_new_tokens, "max_new_tokens")
        if self.limit is not None:
            self.limit = check_int(self.limit, "limit")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {self.dtype!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variants"] = list(self.variants)
        data["attack_eps"] = list(self.attack_eps)
        data["crop_scale"] = None if self.crop_scale is None else list(self.crop_scale)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalSettings":
        data = upgrade_stored_settings(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EvalSettings fields {unknown}")
        return cls(**data)

    @property
    def budgets(self) -> tuple[float, ...]:
        """0.0 (clean) followed by the attack budgets."""
        return (0.0,) + tuple(self.attack_eps)


_FLAT_FS_FIELDS = ("sigma", "n_samples", "seed")


def upgrade_stored_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as older versions stored them, in today's shape, so an old results folder still resumes under
    the same settings: the first versions kept sigma/n_samples/seed at the top level, and later ones the
    certificates' failure probability as ``certify_alpha`` beside the FSConfig's own; all now live in ``fs`` (an
    FSConfig)."""
    data = dict(data)
    if data.get("fs") is not None and not isinstance(data["fs"], dict):
        return data  # not a settings file this version wrote: compared as stored, the mismatch names the field
    flat = {k: data.pop(k) for k in _FLAT_FS_FIELDS if k in data}
    if "certify_alpha" in data:  # the only alpha an eval used: fs.alpha certified nothing there
        flat["alpha"] = data.pop("certify_alpha")
    if flat:
        merged = {**dict(data.get("fs") or {}), **flat}
        try:
            data["fs"] = FSConfig(**merged).to_dict()
        except (TypeError, ValueError):  # an odd stored value: kept as stored, so the refusal names it
            data["fs"] = merged
    return data


# how an eval folder resumes (fs_mllm.results.ResultsFolder's rule): the keys that only choose rows may change,
# an older settings.json is upgraded first
RESUME_RULE = {"may_change": _EXTENSIBLE, "upgrade": upgrade_stored_settings,
               "fix": "use a new output folder (--output-dir) or restore the original settings"}


def verify_settings(output_dir: Path, stored_settings: dict[str, Any]) -> None:
    """Raise :class:`SettingsMismatchError` unless the folder's ``settings.json`` matches (extensible keys aside)."""
    check_settings(output_dir, stored_settings, **RESUME_RULE)

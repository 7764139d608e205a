"""What the defense buys: base / FS / FS+GSB under both threat models, side by side, on one question set.

Why one module: the demo and ``benchmarks/bench_defense.py`` must report the same rows computed the
same way, and a robustness figure must always name its protocol (DESIGN.md section 6):

* **transfer** (the paper's protocol): targeted feature matching towards a target image (AttackVLM;
  M-Attack's local crops), crafted *once* on the undefended model (or named surrogates) and replayed
  unchanged on every variant. Base is attacked by the same images, so base attack success says
  whether the attack works at all: an attack that fails on base proves nothing about FS.
* **adaptive** (white-box against the defense): PGD through each variant's own smoothed path with EOT
  (:mod:`fs_mllm.attacks`), untargeted on the answer by default.
* **noise** (a control, not an attack): random +-eps sign noise at each transfer budget, replayed on every
  variant. A smoothed variant's noise stream is seeded by the image's pixels, so any perturbation gets
  a fresh Monte-Carlo draw and some answers flip without any adversary; an attack's success is only
  what it adds over this row.

Rows (one per variant x protocol x budget) carry: accuracy on the attacked questions, untargeted attack
success (a right answer turned wrong), targeted success (transfer: the answer became the variant's own
answer for the target image, counted where that differs from its clean answer), mean FCS of the
decoder-facing features clean vs attacked, and the mean certified FCSB at the budget (an linf ball of
radius e lies inside the l2 ball of radius e * sqrt(d), so that is the l2 radius certified; vacuous
bounds count as -1, the trivial cosine bound).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import AttackConfig, attack, feature_cosine, generate_text, image_features, without_added_defaults
from .certify import certify_model
from .config import ATTACK_EOT_SAMPLES, ATTACK_STEPS, CertifyConfig, DEFENSE_ANSWER_TOKENS, FSConfig, TRANSFER_STEPS
from .patching import patch_model, unpatch_model
from .stats import fcsb
from .surrogates import check_ensemble_weighting, check_surrogates

VARIANTS = ("base", "fs", "fs+gsb")
TRANSFER_LINF = (4 / 255, 8 / 255, 16 / 255)
ADAPTIVE_L2 = (0.0625, 0.125, 0.25, 0.5, 1.0)
ADAPTIVE_LINF = (1 / 255, 2 / 255, 4 / 255)


def check_variants(variants: Any, name: str = "variants") -> tuple[str, ...]:
    """A non-empty tuple of distinct VARIANTS, from a tuple/list or a comma string ("base,fs+gsb"): the one check
    of the defense table's and the evaluations' ``variants`` and the attack pipeline's ``modes`` (``name``)."""
    given = variants
    if isinstance(variants, str):
        variants = variants.split(",")
    try:
        variants = tuple(str(v).strip() for v in variants if str(v).strip())
    except TypeError:
        raise ValueError(f"{name} must be a comma-separated subset of {list(VARIANTS)}, got {given!r}") from None
    if not variants:
        raise ValueError(f"{name} must name at least one of {list(VARIANTS)}, got {given!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"{name} must be a comma-separated subset of {list(VARIANTS)}, got {given!r} "
                         f"(unknown: {', '.join(map(repr, unknown))})")
    if len(set(variants)) != len(variants):
        raise ValueError(f"{name} must not repeat a variant, got {given!r}")
    return variants

__all__ = ["VARIANTS", "DefenseCheckpoint", "DefenseSettings", "check_variants", "EvalItem", "answer_metrics", "apply_variant",
           "budget_label", "defense_table", "evaluate_defense", "synthetic_items"]


def apply_variant(model: nn.Module, variant: str, config: FSConfig, processor: Any = None, booster: Any = None) -> nn.Module:
    """Put ``model`` in one of VARIANTS: unpatched, smoothed with ``config``, or smoothed with the booster too."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    unpatch_model(model)
    if variant == "base":
        return model
    if variant == "fs+gsb" and booster is None:
        raise ValueError("variant 'fs+gsb' needs booster= (a GaussianSmoothnessBooster)")
    return patch_model(model, config, processor=processor, booster=booster if variant == "fs+gsb" else None)


@dataclass
class DefenseSettings:
    """One defense evaluation. Budgets are in [0,1] pixel units; an empty tuple skips that protocol."""

    fs: FSConfig = field(default_factory=FSConfig)  # the smoothing of the FS variants
    variants: tuple[str, ...] = VARIANTS
    transfer_linf: tuple[float, ...] = TRANSFER_LINF
    transfer_steps: int = TRANSFER_STEPS
    transfer_step_size: float = 1 / 255
    crop_scale: Optional[tuple[float, float]] = (0.5, 1.0)
    crop_views: int = 1  # forwards per transfer gradient, each its own crop (M-Attack: 1)
    crop_full_view: bool = False  # the first of them sees the whole image (needs crop_views >= 2)
    surrogates: Optional[tuple[str, ...]] = None  # None: the undefended model's own image path
    ensemble_weighting: str = "mean"  # how several surrogates add up (AttackConfig.ensemble_weighting)
    adaptive_l2: tuple[float, ...] = ADAPTIVE_L2
    adaptive_linf: tuple[float, ...] = ADAPTIVE_LINF
    adaptive_steps: int = ATTACK_STEPS
    eot_samples: int = ATTACK_EOT_SAMPLES
    adaptive_objective: str = "untargeted"
    certify_images: int = 16
    certify_n: int = CertifyConfig.n  # the certificates' failure probability is the smoothing's: fs.alpha
    max_new_tokens: int = DEFENSE_ANSWER_TOKENS
    seed: int = 0
    noise_linf: Optional[tuple[float, ...]] = None  # the random-noise control's budgets; None: the transfer budgets
    attack_batch_size: int = 8  # images per adaptive attack call: memory holds their graphs through the language model
    adaptive_examples: Optional[int] = None  # the first this many attack items get the adaptive attack; None: all

    def __post_init__(self) -> None:
        self.variants = check_variants(self.variants)
        if self.adaptive_objective not in ("untargeted", "feature"):
            raise ValueError(f"adaptive_objective must be 'untargeted' or 'feature', got {self.adaptive_objective!r}")
        if not isinstance(self.fs, FSConfig):
            raise ValueError(f"fs must be an fs_mllm.FSConfig (the smoothing of the FS variants), got {type(self.fs).__name__}")
        for name in ("transfer_steps", "adaptive_steps", "eot_samples", "certify_n", "max_new_tokens", "attack_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.certify_images, bool) or not isinstance(self.certify_images, int) or self.certify_images < 0:
            raise ValueError(f"certify_images must be an integer >= 0, got {self.certify_images!r}")
        if self.adaptive_examples is not None and (isinstance(self.adaptive_examples, bool)
                                                   or not isinstance(self.adaptive_examples, int) or self.adaptive_examples < 1):
            raise ValueError(f"adaptive_examples must be an integer >= 1 or None (every attack item), got {self.adaptive_examples!r}")
        if self.surrogates is not None:
            if isinstance(self.surrogates, str) or not all(isinstance(name, str) for name in self.surrogates):
                raise ValueError(f"surrogates must be a tuple of names (stored in the settings), got {self.surrogates!r}")
            self.surrogates = tuple(self.surrogates)
            if self.transfer_linf:  # a misspelt or missing encoder is refused before any crafting
                check_surrogates(self.surrogates)
        check_ensemble_weighting(self.ensemble_weighting, self.surrogates)
        # the attacks' own parameters, then every budget, through AttackConfig's checks before any model work
        self._transfer_config(1 / 255)
        self._adaptive_config("l2", 0.5)
        for name, norm, budgets in (("transfer_linf", "linf", self.transfer_linf), ("noise_linf", "linf", self.noise_budgets),
                                    ("adaptive_l2", "l2", self.adaptive_l2), ("adaptive_linf", "linf", self.adaptive_linf)):
            for eps in budgets:
                try:
                    AttackConfig(norm=norm, eps=eps)
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None

    @property
    def noise_budgets(self) -> tuple[float, ...]:
        """The noise control's budgets: ``noise_linf``, or the transfer budgets when it is None."""
        return tuple(self.transfer_linf if self.noise_linf is None else self.noise_linf)

    def _transfer_config(self, eps: float) -> AttackConfig:
        return AttackConfig(norm="linf", eps=eps, steps=self.transfer_steps, step_size=self.transfer_step_size,
                            objective="feature_target", protocol="transfer", crop_scale=self.crop_scale,
                            crop_views=self.crop_views, crop_full_view=self.crop_full_view,
                            ensemble_weighting=self.ensemble_weighting, seed=self.seed)

    def _adaptive_config(self, norm: str, eps: float) -> AttackConfig:
        return AttackConfig(norm=norm, eps=eps, steps=self.adaptive_steps, objective=self.adaptive_objective,
                            protocol="adaptive", eot_samples=self.eot_samples, eot_chunk_size=1, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalItem:
    """One question about one [0,1] image, with the accepted answers and a target image for transfer."""

    image: torch.Tensor  # (3, H, W)
    question: str
    answers: list[str]
    target: torch.Tensor  # (3, H, W): another image, whose features the transfer attack pulls towards
    prompt: str = ""
    meta: dict = field(default_factory=dict)


def synthetic_items(n_images: int, size: int, prompt_fn: Any, first_question_only: bool = False, start: int = 0) -> list[EvalItem]:
    """Held-out synthetic questions (fs-mini-llava's own task): every question of ``n_images`` images, or
    only the first of each. The target of image i is held-out image i+1 (another scene, other answers)."""
    from .image_io import to_tensor01
    from .synthetic import make_dataset

    examples = make_dataset(n_images + 1, split="heldout", size=size, start=start)
    tensors = [to_tensor01(e.image, size) for e in examples]
    items = []
    for i, example in enumerate(examples[:n_images]):
        for question, answers in example.qa[:1] if first_question_only else example.qa:
            items.append(EvalItem(tensors[i], question, list(answers), tensors[i + 1], prompt_fn(question),
                                  {"image_index": start + i}))
    return items


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if len(values) else None


def _l2_radius(norm: str, eps: float, image: torch.Tensor) -> float:
    return eps if norm == "l2" else eps * math.sqrt(image.numel())


# settings that only choose which rows a run computes: a resumed run may change them (e.g. one variant per call)
_ROW_CHOICES = ("variants", "transfer_linf", "noise_linf", "adaptive_l2", "adaptive_linf")
_TRANSFER_FILE = "transfer_linf_{}.safetensors"  # one file of crafted images per budget, in a checkpoint
ROW_FIELDS = ("variant", "protocol", "norm", "eps", "n", "accuracy", "attack_success", "targeted_success", "fcs",
              "right_before", "right_after", "certified_fcsb", "certified_radius_l2", "certified_images",
              "certified_share", "certified_fcsb_guaranteed")
# absent (None) in rows that older checkpoints hold
_LATER_ROW_FIELDS = ("certified_images", "right_before", "right_after", "certified_share", "certified_fcsb_guaranteed")


def _hash_tensors(digest: Any, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    for name, tensor in named:
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def _fingerprint(items: Sequence[EvalItem]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        _hash_tensors(digest, [("image", item.image), ("target", item.target)])
        digest.update(json.dumps([item.question, item.answers, item.prompt]).encode())
    return digest.hexdigest()


def module_fingerprint(module: Any) -> Optional[str]:
    """A hash of every weight (names, shapes, dtypes, bytes): another checkpoint or a retrained model is another run."""
    if module is None:
        return None
    if not isinstance(module, nn.Module):
        return f"{type(module).__module__}.{type(module).__qualname__} (not an nn.Module: not fingerprinted)"
    digest = hashlib.blake2b(digest_size=16)
    _hash_tensors(digest, sorted(module.state_dict().items()))
    return digest.hexdigest()


def _processor_identity(processor: Any) -> Optional[str]:
    image_processor = getattr(processor, "image_processor", processor)
    to_json = getattr(image_processor, "to_json_string", None)
    return to_json() if callable(to_json) else (None if processor is None else type(processor).__name__)


# the settings the crafted transfer images depend on; the rest (the smoothing, the variants, the other
# protocols) only change how they are replayed
_CRAFTING_FIELDS = ("seed", "transfer_steps", "transfer_step_size", "crop_scale", "crop_views", "crop_full_view", "surrogates",
                    "ensemble_weighting")
# the settings an adaptive attack's images depend on besides the variant (and, for fs+gsb, the booster): the
# smoothing it attacks through, the attack itself and which items it attacks in which batches
_ADAPTIVE_FIELDS = ("fs", "seed", "adaptive_steps", "eot_samples", "adaptive_objective", "attack_batch_size",
                    "adaptive_examples")
_BOOSTER_KEY = "booster"  # safetensors metadata of a kept fs+gsb adaptive batch: the booster it was crafted through


def _identity(settings: DefenseSettings, clean_items: Sequence[EvalItem], attack_items: Sequence[EvalItem],
              model: nn.Module, processor: Any, device: str) -> dict[str, Any]:
    """What a checkpoint's ``settings.json`` records: the settings less the row choices, the question sets, the
    model, the processor, the package version and the device type."""
    from .version import __version__

    # the fields added since checkpoints were first written stay out at their old values: older folders resume
    chosen = without_added_defaults({k: v for k, v in settings.to_dict().items() if k not in _ROW_CHOICES})
    return {"settings": chosen, "clean_items": _fingerprint(clean_items), "attack_items": _fingerprint(attack_items),
            "model": module_fingerprint(model), "processor": _processor_identity(processor),
            "fs_mllm_version": __version__, "device_type": torch.device(device).type}


def _one_alpha(folder: Path, saved: Any) -> Any:
    """A checkpoint's settings.json from before DefenseSettings lost its own ``alpha`` (the certificates' failure
    probability is now ``fs.alpha``, the one of the smoothing): the stored alpha drops out where it was fs.alpha,
    as it was by default, or where the run certified nothing; where the two differed, the folder's certificates
    are of an alpha no setting names now.

    Raises:
        SettingsMismatchError: the stored alpha and fs.alpha differ and the run certified images.
    """
    from .results import SettingsMismatchError

    settings = saved.get("settings") if isinstance(saved, dict) else None
    if not isinstance(settings, dict) or "alpha" not in settings or not isinstance(settings.get("fs"), dict):
        return saved  # not a file this version wrote: compared as stored, the refusal names what differs
    smoothing_alpha = settings["fs"].get("alpha")
    if settings["alpha"] != smoothing_alpha and settings.get("certify_images") != 0:  # with no certificates it decided nothing
        raise SettingsMismatchError(
            f"checkpoint {str(folder)!r} holds certificates at alpha={settings['alpha']!r} while its smoothing's alpha "
            f"(fs.alpha) was {smoothing_alpha!r}; DefenseSettings has one alpha now, fs.alpha, so it cannot resume: "
            "use another checkpoint folder (or delete this one)")
    return {**saved, "settings": {k: v for k, v in settings.items() if k != "alpha"}}


def _replay_identity(identity: Any, fields: Sequence[str]) -> dict[str, Any]:
    """The part of a checkpoint identity that fixes its crafted images of one kind: no clean questions, and of
    the settings only ``fields`` (``_CRAFTING_FIELDS`` for transfer, ``_ADAPTIVE_FIELDS`` for adaptive)."""
    identity = identity if isinstance(identity, dict) else {}
    stored = identity.get("settings") if isinstance(identity.get("settings"), dict) else {}
    chosen = {k: v for k, v in stored.items() if k in fields}
    return {**{k: v for k, v in identity.items() if k not in ("settings", "clean_items")},
            "settings": without_added_defaults(chosen)}


class _ReplaySource:
    """Another run's checkpoint whose crafted images this run replays instead of crafting them again, checked
    first to have crafted them as this run would: the same model and processor, attack images (with their
    targets, questions and prompts), package version and device type, and the settings those images depend
    on. ``kind`` "transfer": the crafting settings (seed, steps, step size, crops, surrogates); its smoothing,
    variants and clean questions may differ (that is what reusing them is for, e.g. another n0). ``kind``
    "adaptive": the images each variant's adaptive attack kept (``keep_adaptive_images``), which depend on the
    smoothing attacked through and the attack's settings (``_ADAPTIVE_FIELDS``), and for fs+gsb on the booster
    (its fingerprint, kept with each file, is checked when the file is read). Read only; its settings are
    checked again before each file is read, so a folder claimed afresh by another run meanwhile is never mixed in."""

    def __init__(self, folder: str | os.PathLike, settings: DefenseSettings, attack_items: Sequence[EvalItem],
                 model: nn.Module, processor: Any = None, kind: str = "transfer", booster: Optional[str] = None) -> None:
        from .results import SETTINGS_FILE, SettingsMismatchError, describe_changes

        self.kind = kind
        self.label = f"{kind}_images"
        fields = {"transfer": _CRAFTING_FIELDS, "adaptive": _ADAPTIVE_FIELDS}[kind]
        self.folder = Path(folder)
        self.settings_path = self.folder / SETTINGS_FILE
        if not self.settings_path.is_file():
            raise SettingsMismatchError(f"{self.label} must be a defense checkpoint folder (one holding {SETTINGS_FILE}), "
                                        f"got {str(self.folder)!r}")
        self.claimed = self.settings_path.read_bytes()
        try:
            stored = json.loads(self.claimed)
        except ValueError as error:
            raise SettingsMismatchError(f"{self.label} {str(self.folder)!r}: cannot read {SETTINGS_FILE} ({error})") from None
        device = str(next(model.parameters()).device)
        current = _replay_identity(_identity(settings, (), attack_items, model, processor, device), fields)
        changed = describe_changes(_replay_identity(stored, fields), current)
        if changed:
            raise SettingsMismatchError(
                f"{self.label} {str(self.folder)!r} crafted its images otherwise ({'; '.join(changed)}); craft them in "
                f"this run (leave {self.label} out), or name a folder crafted with these settings")
        if kind == "adaptive" and booster is not None:  # before any work, not when base and fs are done
            from safetensors import safe_open

            for path in sorted(self.folder.glob("adaptive_fs+gsb_*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    crafted_through = (handle.metadata() or {}).get(_BOOSTER_KEY)
                if crafted_through != booster:
                    raise SettingsMismatchError(
                        f"{self.label} file {path} was crafted through another booster ({crafted_through}, this run's is "
                        f"{booster}); name a folder crafted through this booster, or leave {self.label} out")

    def read(self, name: str, like: torch.Tensor, booster: Optional[str] = None) -> Optional[dict[str, torch.Tensor]]:
        """The tensors saved as ``name`` ("adv" on ``like``'s device), or None if the folder has none; for an
        fs+gsb adaptive file, ``booster`` is the fingerprint of the booster this run attacks through."""
        from safetensors import safe_open

        path = self.folder / name
        if not path.is_file():
            return None
        if not self.settings_path.is_file() or self.settings_path.read_bytes() != self.claimed:
            raise ValueError(f"{self.label} {str(self.folder)!r} was claimed by another run since it was checked; "
                             "name a folder no run is writing to")
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                metadata = handle.metadata() or {}
            adv = tensors["adv"]
            if self.kind == "adaptive" and "fcs" not in tensors:
                raise KeyError("the file holds no 'fcs'")
        except Exception as error:
            raise ValueError(f"{self.label} file {path} is unreadable ({error}); name another folder") from None
        if booster is not None and metadata.get(_BOOSTER_KEY) != booster:
            raise ValueError(f"{self.label} file {path} was crafted through another booster "
                             f"({metadata.get(_BOOSTER_KEY)}, this run's is {booster}); name a folder crafted through "
                             "this booster, or leave adaptive_images out")
        if adv.shape != like.shape:
            raise ValueError(f"{self.label} file {path} holds images of shape {tuple(adv.shape)}, "
                             f"the attack images are {tuple(like.shape)}; name another folder")
        return {**tensors, "adv": adv.to(like.device)}


class DefenseCheckpoint:
    """A folder that makes a long defense run resumable: rerun with the same folder and finished work is
    read back instead of recomputed. A stop loses at most the stage in progress: one row, one variant's
    clean answers and certificates, the crafting of one transfer budget, or one batch of an adaptive attack.

    ``settings.json`` names what the folder holds: the settings, the question set, the model's weights and
    processor, the package version and the device type; once the folder holds any result (a row or crafted
    images) a run that differs in any of them is refused before any work, while a folder that holds none
    (its first run stopped before finishing anything) is claimed by the new run. ``rows.jsonl`` (the crash-safe store of :mod:`fs_mllm.results`) gets every
    row, and each variant's clean answers and certificates, the moment they exist (the fs+gsb ones with
    the booster's fingerprint, checked on resume). ``transfer_linf_<eps>.safetensors`` holds the crafted
    transfer images, so every variant, in this run or a resumed one, replays the same images; each finished
    batch of an adaptive attack (``attack_batch_size`` images) is kept until its row is written. Which
    variants and budgets a run computes may change between runs: rows are keyed by
    (variant, protocol, norm, budget).
    """

    def __init__(self, folder: str | os.PathLike, settings: DefenseSettings, clean_items: Sequence[EvalItem],
                 attack_items: Sequence[EvalItem], model: nn.Module, processor: Any = None, booster: Any = None,
                 device: str = "cpu") -> None:
        from .results import ResultsFolder, ResultsFolderError

        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint must be a folder, got the file {self.folder}")
        self.folder.mkdir(parents=True, exist_ok=True)
        identity = _identity(settings, clean_items, attack_items, model, processor, device)
        self.results = ResultsFolder(
            self.folder, identity, label="checkpoint", upgrade=functools.partial(_one_alpha, self.folder),
            fix="rerun with what it was started with, or use another checkpoint folder (or delete this one)",
            other_results=any(self.folder.glob("*.safetensors")))  # crafted images are results too
        self.done = self.results.done
        boosted = self.done.get(("state", "fs+gsb", "", 0.0))
        if boosted is not None and "fs+gsb" in settings.variants and boosted.get("booster") != module_fingerprint(booster):
            self.results.close()
            raise ResultsFolderError(f"checkpoint {self.folder} holds fs+gsb rows of another booster; pass the "
                                     "booster they were made with, or use another checkpoint folder")

    def get(self, key: tuple) -> Optional[dict[str, Any]]:
        """The record saved under ``key`` (without its key), rows in ROW_FIELDS order; None if not done."""
        found = self.done.get(tuple(key))
        if found is None:
            return None
        record = {k: v for k, v in found.items() if k != "key"}
        if key[0] == "state":
            return record
        return {k: record.get(k) if k in _LATER_ROW_FIELDS else record[k] for k in ROW_FIELDS}

    def put(self, key: tuple, record: dict[str, Any]) -> dict[str, Any]:
        """Save ``record`` under ``key`` (flushed to disk) and return it as a resumed run would read it."""
        self.results.put(key, record)
        return self.get(key)

    def tensors(self, name: str, make: Callable[[], dict[str, torch.Tensor]],
                metadata: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
        """The tensors saved as ``name`` (crafted images): read back, or made now and saved (durably) before use,
        with ``metadata`` (safetensors string metadata, e.g. the booster an adaptive batch was crafted through)."""
        from safetensors.torch import load_file, save_file

        from .results import ResultsFolderError, durable_replace

        path = self.folder / name
        if path.exists():
            try:
                return load_file(str(path))
            except Exception as error:  # a torn or foreign file: making it again is deterministic
                raise ResultsFolderError(f"checkpoint file {path} is unreadable ({error}); delete it and rerun "
                                         "(the images are crafted again, identically)") from None
        made = make()
        temporary = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in made.items()}, str(temporary), metadata=metadata)
        durable_replace(temporary, path)
        return made

    def forget(self, name: str) -> None:
        """Delete the tensors saved as ``name`` once the row they were kept for is written."""
        (self.folder / name).unlink(missing_ok=True)

    def close(self) -> None:
        self.results.close()


def _row_key(variant: str, protocol: str, norm: str, eps: float) -> tuple:
    return (variant, protocol, norm, float(eps))


def evaluate_defense(model: nn.Module, processor: Any, clean_items: Sequence[EvalItem], attack_items: Sequence[EvalItem],
                     settings: DefenseSettings, booster: Any = None, progress: bool = True,
                     checkpoint: Optional[str | os.PathLike] = None,
                     transfer_images: Optional[str | os.PathLike] = None,
                     adaptive_images: Optional[str | os.PathLike] = None,
                     keep_adaptive_images: bool = False) -> list[dict[str, Any]]:
    """Rows of the defense table (see the module doc); ``clean_items`` give clean accuracy, ``attack_items``
    are attacked (one question per image) under every budget of both protocols, and replayed with the noise
    control. With ``checkpoint`` (a folder, :class:`DefenseCheckpoint`) the run is resumable: rerun with the
    same folder to go on. ``transfer_images`` names another run's checkpoint whose crafted images are replayed
    where it has them, instead of crafting them again (checked first, :class:`_ReplaySource`);
    ``adaptive_images`` likewise names a checkpoint whose adaptive attacks kept their images
    (``keep_adaptive_images=True``: a checkpoint then keeps each adaptive batch instead of deleting it once its
    row is written), replayed for each variant and budget it has, after the same check plus the smoothing,
    the adaptive attack's settings and, for fs+gsb, the booster. When ``clean_items`` are the attack items
    (the same images, questions and prompts), clean accuracy reuses each variant's answers on them."""
    if not clean_items or not attack_items:
        raise ValueError("clean_items and attack_items must not be empty")
    if "fs+gsb" in settings.variants and booster is None:
        raise ValueError("variants include 'fs+gsb' but booster is None")
    if keep_adaptive_images and checkpoint is None:
        raise ValueError("keep_adaptive_images keeps the adaptive attacks' images in the checkpoint; pass checkpoint= too")
    booster_id = module_fingerprint(booster) if "fs+gsb" in settings.variants else None
    sources = {kind: _ReplaySource(folder, settings, attack_items, model, processor, kind=kind, booster=booster_id)
               for kind, folder in (("transfer", transfer_images), ("adaptive", adaptive_images)) if folder is not None}
    store = None
    if checkpoint is not None:
        device = str(next(model.parameters()).device)
        store = DefenseCheckpoint(checkpoint, settings, clean_items, attack_items, model, processor, booster, device)
    try:
        return _evaluate_defense(model, processor, clean_items, attack_items, settings, booster, progress, store,
                                 sources, keep_adaptive_images)
    finally:
        if store is not None:
            store.close()


def _evaluate_defense(model: nn.Module, processor: Any, clean_items: Sequence[EvalItem], attack_items: Sequence[EvalItem],
                      settings: DefenseSettings, booster: Any, progress: bool,
                      store: Optional[DefenseCheckpoint], sources: dict[str, _ReplaySource],
                      keep_adaptive_images: bool) -> list[dict[str, Any]]:
    from .answers import answers_match as vqa_match

    source, adaptive_source = sources.get("transfer"), sources.get("adaptive")
    clean_is_attack = _fingerprint(clean_items) == _fingerprint(attack_items)
    adaptive_count = len(attack_items) if settings.adaptive_examples is None else min(settings.adaptive_examples, len(attack_items))

    sigma = settings.fs.sigma
    attack_images = torch.stack([item.image for item in attack_items])
    targets = torch.stack([item.target for item in attack_items])
    attack_prompts = [item.prompt for item in attack_items]
    attack_answers = [item.answers for item in attack_items]
    clean_images = torch.stack([item.image for item in clean_items])
    clean_prompts = [item.prompt for item in clean_items]
    budgets = [("noise", "linf", eps) for eps in settings.noise_budgets]
    budgets += [("transfer", "linf", eps) for eps in settings.transfer_linf]
    budgets += [("adaptive", "l2", eps) for eps in settings.adaptive_l2]
    budgets += [("adaptive", "linf", eps) for eps in settings.adaptive_linf]

    def saved(key: tuple) -> Optional[dict[str, Any]]:
        return store.get(key) if store is not None else None

    def keep(key: tuple, record: dict[str, Any]) -> dict[str, Any]:
        return store.put(key, record) if store is not None else record

    def missing(protocol: str, eps: float) -> bool:  # a replayed budget some variant has no row for yet
        return any(saved(_row_key(v, protocol, "linf", eps)) is None for v in settings.variants)

    # the images every variant is shown unchanged, for the budgets some variant still needs: the transfer
    # images, crafted once without the defense before any variant sees them, and the noise control
    unpatch_model(model)
    replayed: dict[tuple[str, float], torch.Tensor] = {}
    pending = [eps for eps in settings.transfer_linf if missing("transfer", eps)]
    if store is not None and progress:
        read_back = sum(key[0] in settings.variants for key in store.done)
        if read_back:
            tqdm.write(f"resuming from {store.folder}: {read_back} finished rows read back")
    for eps in tqdm(pending, desc="crafting transfer images" if source is None else f"transfer images from {source.folder}",
                    disable=not progress or not pending):
        name = _TRANSFER_FILE.format(repr(float(eps)))

        def craft(eps: float = eps, name: str = name) -> torch.Tensor:
            reused = None if source is None else source.read(name, attack_images)
            if reused is not None:
                return reused["adv"]
            if source is not None and progress:
                tqdm.write(f"transfer_images {source.folder} has no images for linf {eps:.4g}: crafting them")
            config = settings._transfer_config(eps)
            with tqdm(total=config.steps, desc=f"linf {eps:.4g}", unit="step", leave=False, disable=not progress) as bar:
                return attack(model, processor, attack_images, None, config, target_images=targets,
                              surrogates=list(settings.surrogates) if settings.surrogates else None,
                              progress=lambda step, loss: bar.update(1)).adv_images
        if store is None:
            replayed["transfer", eps] = craft()
        else:
            replayed["transfer", eps] = store.tensors(name, lambda craft=craft: {"adv": craft()})["adv"].to(attack_images.device)
    replayed.update({("noise", eps): _sign_noise(attack_images, eps, settings.seed) for eps in settings.noise_budgets
                     if missing("noise", eps)})

    def adaptive_files(variant: str, norm: str, eps: float) -> list[tuple[int, str]]:
        """(first image, checkpoint file name) of each batch of one adaptive row."""
        return [(start, f"adaptive_{variant}_{norm}_{float(eps)!r}_from{start}.safetensors")
                for start in range(0, adaptive_count, settings.attack_batch_size)]

    def adaptive_attack(variant: str, norm: str, eps: float) -> tuple[torch.Tensor, list[float]]:
        """The adaptive attack on the patched variant, ``attack_batch_size`` images per call (each batch replayed
        from ``adaptive_images`` where it has it); with a checkpoint each finished batch is kept until its row is
        written (or for good, with ``keep_adaptive_images``), so a stop loses at most one batch."""
        # untargeted: push the model away from the accepted answer (what accuracy counts)
        answers = [a[0] for a in attack_answers] if settings.adaptive_objective == "untargeted" else None
        booster_id = module_fingerprint(booster) if variant == "fs+gsb" else None
        metadata = {_BOOSTER_KEY: booster_id} if booster_id is not None else None
        batches = []
        files = adaptive_files(variant, norm, eps)
        for start, name in tqdm(files, desc=f"{variant} adaptive {norm} {eps:.4g}", leave=False,
                                disable=not progress or len(files) < 2):
            stop = min(start + settings.attack_batch_size, adaptive_count)

            def run(start: int = start, stop: int = stop, name: str = name) -> dict[str, torch.Tensor]:
                if adaptive_source is not None:
                    reused = adaptive_source.read(name, attack_images[start:stop], booster=booster_id)
                    if reused is not None:
                        return reused
                result = attack(model, processor, attack_images[start:stop], attack_prompts[start:stop] if answers else None,
                                settings._adaptive_config(norm, eps), answers=answers[start:stop] if answers else None)
                return {"adv": result.adv_images, "fcs": torch.tensor(result.fcs, dtype=torch.float64)}

            batches.append(store.tensors(name, run, metadata) if store is not None else run())
        adv = torch.cat([batch["adv"].to(attack_images.device) for batch in batches])
        return adv, torch.cat([batch["fcs"] for batch in batches]).tolist()

    rows: list[dict[str, Any]] = []
    for variant in settings.variants:
        keys = [_row_key(variant, "clean", "-", 0.0)] + [_row_key(variant, *budget) for budget in budgets]
        if all(saved(key) is not None for key in keys):
            rows += [saved(key) for key in keys]
            continue
        apply_variant(model, variant, settings.fs, processor, booster)
        bar = tqdm(total=len(keys), desc=variant, unit="row", disable=not progress)
        # the variant's answers on the clean attack images and on their targets, and its certificates
        state = saved(("state", variant, "", 0.0))
        # the variant's answers for the target images, which only targeted success of a transfer row compares with
        needs_targets = any(saved(key) is None for key, budget in zip(keys[1:], budgets) if budget[0] == "transfer")

        def target_answers() -> list[str]:
            return generate_text(model, processor, targets, attack_prompts, settings.max_new_tokens) if needs_targets else []

        # the variant's features of the clean attack images (FCS of every transfer and noise row), read back from
        # the generate that answers them; computed again only when the answers were read back from a checkpoint
        captured: list[torch.Tensor] = []
        if state is None:
            s_low: list[float] = []
            if variant != "base" and settings.certify_images:
                certificates = []
                for i in range(min(settings.certify_images, len(attack_items))):
                    certificates += certify_model(model, attack_images[i:i + 1], n=settings.certify_n, alpha=settings.fs.alpha)
                s_low = [c.score_lower for c in certificates]
            state = keep(("state", variant, "", 0.0), {
                "clean_attack_out": generate_text(model, processor, attack_images, attack_prompts, settings.max_new_tokens,
                                                  features=captured),
                "target_out": target_answers(),
                "s_low": s_low, "booster": module_fingerprint(booster) if variant == "fs+gsb" else None})
        elif needs_targets and not state["target_out"]:  # a resumed run that adds the first transfer budget
            state = keep(("state", variant, "", 0.0), {**state, "target_out": target_answers()})

        def certified(radius: float, count: Optional[int] = None) -> dict[str, Any]:
            """The certificates at ``radius`` of the certified images among the first ``count`` (a row's own items)."""
            return certified_summary([float(fcsb(s, radius, sigma)) for s in state["s_low"][:count]], radius)

        row = saved(keys[0])
        if row is None:
            clean_out = (state["clean_attack_out"] if clean_is_attack  # the same questions: the same answers
                         else generate_text(model, processor, clean_images, clean_prompts, settings.max_new_tokens))
            clean_correct = [vqa_match(o, item.answers) for o, item in zip(clean_out, clean_items)]
            row = keep(keys[0], {"variant": variant, "protocol": "clean", "norm": "-", "eps": 0.0, "n": len(clean_items),
                                 "accuracy": _mean([float(c) for c in clean_correct]), "attack_success": None,
                                 "targeted_success": None, "fcs": None, "right_before": None,
                                 "right_after": sum(clean_correct), **certified(sigma / 2)})
        rows.append(row)
        bar.update()
        for key, (protocol, norm, eps) in zip(keys[1:], budgets):
            row = saved(key)
            if row is None:
                count = adaptive_count if protocol == "adaptive" else len(attack_items)  # the first `count` items
                if protocol in ("transfer", "noise"):  # FCS as this variant's decoder sees the replayed images
                    adv, adv_features = replayed[protocol, eps], []
                    adv_out = generate_text(model, processor, adv, attack_prompts, settings.max_new_tokens,
                                            features=adv_features)
                    if not captured:
                        with torch.no_grad():
                            captured.append(image_features(model, attack_images, processor=processor))
                    fcs = feature_cosine(captured[0], adv_features[0]).tolist()
                else:
                    adv, fcs = adaptive_attack(variant, norm, eps)
                    adv_out = generate_text(model, processor, adv, attack_prompts[:count], settings.max_new_tokens)
                metrics = answer_metrics(state["clean_attack_out"][:count], adv_out, attack_answers[:count],
                                         state["target_out"] if protocol == "transfer" else None)
                radius = _l2_radius(norm, eps, attack_images[0])
                row = keep(key, {"variant": variant, "protocol": protocol, "norm": norm, "eps": float(eps),
                                 "n": count, **metrics, "fcs": _mean(fcs), **certified(radius, count)})
                if store is not None and protocol == "adaptive" and not keep_adaptive_images:
                    for _, name in adaptive_files(variant, norm, eps):
                        store.forget(name)
            rows.append(row)
            bar.update()
        bar.close()
    unpatch_model(model)
    return rows


def certified_summary(bounds: Sequence[float], radius: float) -> dict[str, Any]:
    """A row's certificate fields from the per-image FCSB at ``radius`` (-1 = no guarantee there):
    ``certified_fcsb`` the mean with -1 for no guarantee (a valid bound on the mean cosine, as stored since
    0.1), ``certified_share`` the share of images with a guarantee and ``certified_fcsb_guaranteed`` the mean
    over those alone (None when none has one): the placeholders never enter that mean."""
    guaranteed = [b for b in bounds if b >= 0]
    return {"certified_fcsb": _mean(bounds) if bounds else None, "certified_radius_l2": radius,
            "certified_images": len(bounds), "certified_share": len(guaranteed) / len(bounds) if bounds else None,
            "certified_fcsb_guaranteed": _mean(guaranteed) if guaranteed else None}


def _sign_noise(images: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """``images`` moved by +-eps on every pixel (random signs, a corner of the linf ball like most transfer
    pixels), clipped to [0,1]: the same images for every variant and every run with this seed."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, images.shape, generator=generator).to(images.device, images.dtype) * 2 - 1
    return (images + eps * signs).clamp(0, 1)


def answer_metrics(clean_outputs: Sequence[str], adv_outputs: Sequence[str], answers: Sequence[Sequence[str]],
                   target_outputs: Optional[Sequence[str]] = None) -> dict[str, Optional[float]]:
    """accuracy of the attacked answers; attack_success: of the questions answered right on the clean image,
    the fraction answered wrong after the attack; targeted_success (when ``target_outputs``, the variant's
    answers for the target images): of the questions whose target answer differs from the clean answer, the
    fraction whose attacked answer became the target answer (a target equal to the clean answer proves nothing).
    right_before / right_after: how many questions were answered right on the clean images / after the attack
    (the counts behind the rates: an attack success of 1.000 may be 1 of 1)."""
    from .answers import answers_match as vqa_match, normalize_answer as norm

    if not (len(clean_outputs) == len(adv_outputs) == len(answers)):
        raise ValueError("clean_outputs, adv_outputs and answers must have one entry per question")
    wrong = [not vqa_match(o, a) for o, a in zip(adv_outputs, answers)]
    flipped = [w for w, c, a in zip(wrong, clean_outputs, answers) if vqa_match(c, a)]
    targeted = None
    if target_outputs is not None:
        aimed = [(o, t) for o, t, c in zip(adv_outputs, target_outputs, clean_outputs) if norm(t) != norm(c)]
        targeted = _mean([float(norm(o) == norm(t)) for o, t in aimed])
    return {"accuracy": _mean([float(not w) for w in wrong]), "attack_success": _mean([float(f) for f in flipped]),
            "targeted_success": targeted, "right_before": len(flipped), "right_after": wrong.count(False)}


def budget_label(protocol: str, norm: str, eps: float) -> str:
    """A budget as the reader knows it: "none" for clean rows, linf in /255, l2 as a number."""
    if protocol == "clean":
        return "none"
    return f"linf {eps * 255:g}/255" if norm == "linf" else f"l2 {eps:g}"


def certified_cell(row: dict[str, Any]) -> str:
    """The certified column: the mean FCSB over the images that have a guarantee at the row's l2 radius and
    how many have one (rows of 0.2 and older, without the share: the mean with -1 for no guarantee)."""
    if row.get("certified_fcsb") is None:
        return "-"
    radius = f"l2 {row['certified_radius_l2']:.3g}"
    if row.get("certified_share") is None:  # older rows
        images = f"; {row['certified_images']}" if row.get("certified_images") is not None else ""
        return f"{row['certified_fcsb']:.3f} ({row['certified_radius_l2']:.3g}{images})"
    total = row["certified_images"]
    have = round(row["certified_share"] * total)
    if not have:
        return f"none of {total} ({radius})"
    return f"{row['certified_fcsb_guaranteed']:.3f} on {have}/{total} ({radius})"


def right_counts(row: dict[str, Any]) -> str:
    """How many answers were right before the attack and after it ("12 -> 3"); clean rows: how many are right."""
    if row.get("right_after") is None:  # rows of 0.2 and older
        return "-"
    if row["protocol"] == "clean" or row.get("right_before") is None:
        return str(row["right_after"])
    return f"{row['right_before']} -> {row['right_after']}"


def defense_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table, budgets written as the reader knows them (linf in /255)."""
    header = ("| variant | protocol | budget | n | right before -> after | accuracy | attack success | targeted success "
              "| FCS | certified FCSB (images with a guarantee) |")
    lines = [header, "|" + "---|" * 10]

    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    for row in rows:
        budget = budget_label(row["protocol"], row["norm"], row["eps"])
        bound = certified_cell(row)
        lines.append(f"| {row['variant']} | {row['protocol']} | {budget} | {row['n']} | {right_counts(row)} | {fmt(row['accuracy'])} | "
                     f"{fmt(row['attack_success'])} | {fmt(row['targeted_success'])} | {fmt(row['fcs'])} | {bound} |")
    return "\n".join(lines)

"""Attack a multimodal LLM end to end (base, feature-space smoothed, smoothed + booster), per example.

``fs-mllm attack`` (fs_mllm/commands/attack.py) parses its command line into an :class:`AttackRun` and
calls :func:`run_attack`; Python callers do the same::

    from fs_mllm.attacks import AttackConfig
    from fs_mllm.evaluation.attack_pipeline import AttackRun, run_attack

    report = run_attack(AttackRun(out="runs/attack", offline_eval="vqa", limit=8, modes=("base", "fs"),
                                  attack=AttackConfig(objective="untargeted", norm="l2", eps=0.5, steps=10)))
    print(report.table)

For each example the processor resizes/crops the image, the [0,1] image at processor resolution is
recovered through the family adapter, and a PGD attack (fs_mllm.attacks) runs against each mode:
``base`` (unpatched), ``fs`` (patch_model with ``sigma``/``n_samples``; the attack is adaptive, EOT over
the smoothing noise) and ``fs+gsb`` (the same plus ``booster``). Outputs, under ``out``:

- ``adv/<example>_<mode>_<settings>.png``: the adversarial image at processor resolution (8-bit PNG,
  so the saved file is the attack rounded to 1/255; the metrics are computed on the unrounded float image);
- ``results.jsonl``: one line per (example, mode, settings), in the append-only results store of the
  evaluations: stop a run (Ctrl-C, a kill) and run it again to resume (finished rows are skipped, a torn
  last line is cut); a run with other settings (another seed, eps, ...) adds its own rows; a second run
  writing to the same folder at once is refused.

Success: targeted = target text in the adversarial output; untargeted/feature = answer wrong (VQA score
0, with the offline VQA set) or, without reference answers, output changed from the clean output.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import torch

from fs_mllm.adapters import get_adapter
from fs_mllm.arguments import check_int
from fs_mllm.attacks import AttackConfig, attack, generate_text, without_added_defaults
from fs_mllm.config import ATTACK_ANSWER_TOKENS, COMMAND_ATTACK_STEPS, FSConfig, check_choice, check_n, check_sigma
from fs_mllm.image_io import IMAGE_SUFFIXES, rgb
from fs_mllm.surrogates import check_ensemble_weighting, check_surrogates
from fs_mllm.defense import VARIANTS, apply_variant, check_variants
from fs_mllm.results import ResultsFolder, finite_or_none, folder_kept_only_with_rows
from fs_mllm.evaluation.robustness import attack_outcomes, outcome_rate, summary_table
from fs_mllm.evaluation.runner import build_prompt_for
from fs_mllm.models.loading import DEFAULT_MODEL, load_model
from fs_mllm.normalization import resolve_mean_std
from fs_mllm.patching import unpatch_model

__all__ = ["AttackReport", "AttackRun", "MODES", "RESULTS_FILE", "run_attack"]

MODES = VARIANTS
RESULTS_FILE = "results.jsonl"
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
OFFLINE_EVAL_TASKS = ("vqa", "caption")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_QUESTION = "Describe the image."  # the prompt of an image folder and of the offline caption set
_FS_DEFAULTS = FSConfig()


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def command_attack_config(**fields: Any) -> AttackConfig:
    """The attack ``fs-mllm attack`` runs unless told otherwise: AttackConfig's, at the command's step count."""
    return AttackConfig(**{"steps": COMMAND_ATTACK_STEPS, **fields})


@dataclass
class AttackRun:
    """One run of the attack pipeline: which examples, which modes, which attack, where the rows go.

    Checked in full on construction (a ValueError naming the field and the fix), before any model loads.

    Attributes:
        out: output folder (adv/ PNGs and results.jsonl); a run with the same settings resumes it.
        model: Hub id or local folder of a supported multimodal model (default: the embedded fs-mini-llava).
        processor: processor id or folder if it is not saved with the model.
        images: folder of images, each asked ``question``; None: the shipped offline photos (``offline_eval``).
        offline_eval: "vqa" (default without ``images``: the photos' questions and answers) or "caption".
        limit: attack at most this many examples (None: all).
        question: the prompt of ``images`` and of ``offline_eval="caption"``.
        prompt_template: e.g. ``"USER: {image}\\n{question} ASSISTANT:"``; None: the processor's chat template.
        attack: the PGD attack (AttackConfig; default: its defaults at ``COMMAND_ATTACK_STEPS`` steps).
        target_image: image file whose features ``objective="feature_target"`` pulls towards.
        surrogates: encoders the transfer protocol crafts on (see fs_mllm.surrogates); None: the model's own
            undefended path (the stronger, grey-box case).
        modes: a subset of MODES (a comma-separated string is split).
        sigma, n_samples: the smoothing of the fs modes (FSConfig's defaults).
        booster: folder of a saved GaussianSmoothnessBooster (needed by mode "fs+gsb").
        max_new_tokens: tokens generated per answer.
        dtype, device: how the model is loaded.
    """

    out: Union[str, os.PathLike]
    model: str = DEFAULT_MODEL
    processor: Optional[str] = None
    images: Optional[Union[str, os.PathLike]] = None
    offline_eval: Optional[str] = None
    limit: Optional[int] = None
    question: str = DEFAULT_QUESTION
    prompt_template: Optional[str] = None
    attack: AttackConfig = field(default_factory=command_attack_config)
    target_image: Optional[Union[str, os.PathLike]] = None
    surrogates: Optional[Sequence[str]] = None
    modes: Union[str, Sequence[str]] = ("base", "fs")
    sigma: float = _FS_DEFAULTS.sigma
    n_samples: int = _FS_DEFAULTS.n_samples
    booster: Optional[Union[str, os.PathLike]] = None
    max_new_tokens: int = ATTACK_ANSWER_TOKENS
    dtype: str = "float32"
    device: str = field(default_factory=default_device)

    def __post_init__(self) -> None:
        self.out = os.fspath(self.out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"out: {self.out} is a file; name a folder")
        if not isinstance(self.attack, AttackConfig):
            raise ValueError(f"attack must be an fs_mllm.attacks.AttackConfig, got {type(self.attack).__name__}")
        if self.images is not None:
            self.images = os.fspath(self.images)
            if self.offline_eval is not None:
                raise ValueError("images and offline_eval are two sources of examples: give one")
            if not os.path.isdir(self.images):
                raise ValueError(f"images: {self.images!r} is not a folder")
        elif self.offline_eval is not None:
            check_choice(self.offline_eval, "offline_eval", OFFLINE_EVAL_TASKS)
        if self.limit is not None:
            check_int(self.limit, "limit")
        self.modes = check_variants(self.modes, "modes")
        if self.booster is not None:
            self.booster = os.fspath(self.booster)
            if not os.path.isdir(self.booster):
                raise ValueError(f"booster: {self.booster!r} is not a folder (a saved GaussianSmoothnessBooster)")
        if "fs+gsb" in self.modes and self.booster is None:
            raise ValueError("modes fs+gsb needs booster (the folder of a saved GaussianSmoothnessBooster)")
        if (self.attack.objective == "feature_target") != (self.target_image is not None):
            raise ValueError("target_image goes with objective feature_target (and that objective needs it)")
        if self.target_image is not None:
            self.target_image = os.fspath(self.target_image)
            if not os.path.isfile(self.target_image):
                raise ValueError(f"target_image: {self.target_image!r} is not a file")
        if self.surrogates is not None:
            if isinstance(self.surrogates, str):
                raise ValueError(f"surrogates must be a list of encoder names, got the string {self.surrogates!r}")
            self.surrogates = list(self.surrogates) or None
        check_ensemble_weighting(self.attack.ensemble_weighting, self.surrogates)
        if self.surrogates:
            if self.attack.protocol != "transfer":
                raise ValueError("surrogates go with protocol transfer")
            check_surrogates(self.surrogates)
        self.sigma = check_sigma(self.sigma)
        check_n(self.n_samples, "n_samples", minimum=1)
        check_int(self.max_new_tokens, "max_new_tokens")
        check_choice(self.dtype, "dtype", DTYPES)

    @property
    def fs_config(self) -> FSConfig:
        """The smoothing of the fs modes (the rest of FSConfig at its defaults)."""
        return FSConfig(sigma=self.sigma, n_samples=self.n_samples)


class AttackReport(NamedTuple):
    rows: list  # every (example, mode) row of this run's settings, examples in order, modes in run.modes order
    summary: list  # per mode: examples, mean_fcs, attack_success_rate, counted, mean_delta_norm
    table: str  # the summary as a markdown table
    results_path: Path


def settings_id(run: AttackRun) -> str:
    """Short hash of everything besides (example, mode) that decides a row: part of its key, so a rerun
    of the same run skips its rows and a run with other settings adds its own (the same keys and values
    the command's rows have always been keyed by, so existing folders resume)."""
    settings = {
        "model": run.model, "processor": run.processor, "dtype": run.dtype,
        "source": os.path.abspath(run.images) if run.images else (run.offline_eval or "vqa"),
        "question": run.question, "prompt_template": run.prompt_template, "attack": without_added_defaults(run.attack.to_dict()),
        "sigma": run.sigma, "n_samples": run.n_samples, "max_new_tokens": run.max_new_tokens,
        "booster": os.path.abspath(run.booster) if run.booster else None,
        "target_image": os.path.abspath(run.target_image) if run.target_image else None,
        "surrogates": run.surrogates,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def iter_examples(run: AttackRun) -> Iterator[dict[str, Any]]:
    """Examples as dicts: id, PIL image, question, reference answers (or None)."""
    from PIL import Image

    if run.images:
        folder = Path(run.images)
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"images: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        stems = collections.Counter(f.stem for f in files)
        shared = sorted(f.name for f in files if stems[f.stem] > 1)
        if shared:  # a row's key is the stem, so two such images would be one row
            raise ValueError(f"images: {folder}: {', '.join(shared)} share a name before the suffix; rename one of each")
        for path in files[: run.limit]:
            yield {"id": path.stem, "image": rgb(Image.open(path)), "question": run.question, "answers": None}
        return
    # the shipped eval set, read lazily: only the photos of the examples attacked are decoded
    from fs_mllm.data import OFFLINE_EVAL_ANNOTATIONS
    from fs_mllm.evaluation.datasets import load_offline_photo

    task = run.offline_eval or "vqa"
    with open(OFFLINE_EVAL_ANNOTATIONS, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    count = 0
    for record in records:
        items = ([(f"q{q['question_id']}", q["question"], list(q["answers"])) for q in record["questions"]]
                 if task == "vqa" else [(f"img{record['image_id']}", run.question, None)])
        photo = None
        for example_id, question, answers in items:
            if run.limit is not None and count >= run.limit:
                return
            photo = photo or load_offline_photo(record["source"])
            count += 1
            yield {"id": example_id, "image": photo, "question": question, "answers": answers}


def make_prompt(processor: Any, question: str, template: str | None, model_id: str = "") -> str:
    if template:
        return template.format(image=getattr(processor, "image_token", None) or "<image>", question=question)
    return build_prompt_for(processor, question, model_id)


def processor_resolution_image(model, processor, image, prompt: str, mean, std) -> tuple[torch.Tensor, dict, dict]:
    """The [0,1] image (1, ..., 3, H, W) the model sees after resize/crop, its per-image family kwargs, and
    the prompt tokens the processor made for the original image (image-token count included)."""
    adapter = get_adapter(model)
    encoded = processor(text=[prompt], images=[image], return_tensors="pt")
    kwargs = {k: encoded[k] for k in adapter.per_image_kwargs if k in encoded}
    pixels = adapter.model_inputs_to_pixels(model, encoded["pixel_values"].float(), mean, std, **kwargs)
    if isinstance(pixels, list):
        raise ValueError("images of different shapes in one example are not supported by the attack pipeline")
    tokens = {k: encoded[k] for k in TOKEN_KEYS if k in encoded}
    return pixels.clamp(0, 1), kwargs, tokens


def save_png(image01: torch.Tensor, path: Path) -> str:
    """Save (3, H, W) or (crops, 3, H, W) [0,1] pixels; several crops go side by side."""
    from PIL import Image

    image = image01.detach().float().cpu()
    if image.ndim == 4:
        image = torch.cat(list(image), dim=-1)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _outcomes(clean_outputs: list[str], adv_outputs: list[str], answers: list, run: AttackRun) -> list[Optional[bool]]:
    """Per row: the attack won, lost, or had nothing to win (None: the clean answer was wrong, or on target, already)."""
    if run.attack.objective == "targeted":
        return attack_outcomes(adv_outputs, clean_outputs, targets=[run.attack.target_text] * len(adv_outputs))
    if all(a is not None for a in answers):
        return attack_outcomes(adv_outputs, clean_outputs, answers_list=answers)
    return attack_outcomes(adv_outputs, clean_outputs)


def _attack_one(model, processor, example: dict, mode: str, run: AttackRun, mean, std,
                out: Path, run_id: str, settings: str) -> dict[str, Any]:
    """One (example, mode) result row; the model is already patched for ``mode``."""
    config = run.attack
    prompt = make_prompt(processor, example["question"], run.prompt_template, run.model)
    images01, image_kwargs, tokens = processor_resolution_image(model, processor, example["image"], prompt, mean, std)
    start = time.time()
    clean_output = generate_text(model, processor, images01, tokens, run.max_new_tokens, mean, std, **image_kwargs)[0]
    target = None
    if run.target_image is not None:
        from PIL import Image

        target, _, _ = processor_resolution_image(model, processor, rgb(Image.open(run.target_image)), prompt, mean, std)
    # transfer + untargeted: the undefended model's own answer is pushed away, so every mode gets the same image
    untargeted_answers = [clean_output] if run.attack.objective == "untargeted" and run.attack.protocol == "adaptive" else None
    result = attack(model, processor, images01, tokens, config, answers=untargeted_answers,
                    image_mean=mean, image_std=std, target_images=target, surrogates=run.surrogates, **image_kwargs)
    adv_output = generate_text(model, processor, result.adv_images, tokens, run.max_new_tokens, mean, std,
                               **image_kwargs)[0]
    success = _outcomes([clean_output], [adv_output], [example["answers"]], run)[0]
    # an absolute path: the row stays valid whatever folder a later run or reader starts in
    png = save_png(result.adv_images[0], out.resolve() / "adv" / f"{example['id']}_{mode.replace('+', '_')}_{settings}.png")
    return {
        "key": [example["id"], mode, settings], "run": run_id, "example": example["id"], "mode": mode,
        "question": example["question"], "answers": example["answers"], "clean_output": clean_output,
        "adv_output": adv_output, "success": success, "fcs": finite_or_none(result.fcs[0]),
        "delta_norm": finite_or_none(result.delta_norm[0]), "final_loss": finite_or_none(result.final_loss),
        "adv_image": png, "seconds": round(time.time() - start, 2), "model": run.model,
        "sigma": None if mode == "base" else run.sigma, "n_samples": None if mode == "base" else run.n_samples,
        "attack": config.to_dict(),
    }


def _attack_all(run: AttackRun, out: Path, progress: bool) -> tuple[dict, list]:
    """Attack every (example, mode) not in ``out`` yet; the rows of this command, and its examples."""
    from tqdm.auto import tqdm

    # the folder exists: folder_kept_only_with_rows made or found it
    settings = settings_id(run)
    with ResultsFolder(out, None, rows_file=RESULTS_FILE) as results:  # locked; each row's key names its settings
        done = results.done
        examples = list(iter_examples(run))
        keys = {(e["id"], m): (e["id"], m, settings) for e in examples for m in run.modes}
        rows = {k: done[key] for k, key in keys.items() if key in done}
        if len(rows) < len(keys):
            model, processor = load_model(run.model, run.device, run.dtype, processor=run.processor)
            adapter = get_adapter(model)
            mean, std = resolve_mean_std(model, adapter, processor)
            booster = None
            if "fs+gsb" in run.modes:
                from fs_mllm.booster.model import GaussianSmoothnessBooster

                booster = GaussianSmoothnessBooster.from_pretrained(run.booster, device=run.device)
            run_id = time.strftime("%Y%m%dT%H%M%S")
            try:
                with tqdm(total=len(keys) - len(rows), desc="attack", disable=not progress) as bar:
                    for example in examples:
                        for mode in run.modes:
                            if (example["id"], mode) in rows:
                                continue
                            # patched afresh per row: its noise stream starts at --seed, so a row does
                            # not depend on which rows ran before it (a resumed run equals an unbroken one)
                            apply_variant(model, mode, run.fs_config, processor, booster)
                            row = _attack_one(model, processor, example, mode, run, mean, std, out, run_id, settings)
                            rows[(example["id"], mode)] = results.put(keys[(example["id"], mode)], row)
                            bar.update(1)
            finally:
                unpatch_model(model)
    return rows, examples


def run_attack(run: AttackRun, *, progress: bool = True) -> AttackReport:
    """Attack every (example, mode) of ``run`` not in ``run.out`` yet; every row of its settings, summarised.

    A run that fails before its first row leaves no folder; one that stops later keeps its rows, and the
    same run resumes from them (a torn last line is cut).
    """
    out = Path(run.out)
    with folder_kept_only_with_rows(out, RESULTS_FILE):
        rows, examples = _attack_all(run, out, progress)
    summary = []
    for mode in run.modes:
        mine = [rows[(e["id"], mode)] for e in examples]
        # from the stored answers, so rows written before the rule changed are counted by it too
        outcomes = _outcomes([r["clean_output"] for r in mine], [r["adv_output"] for r in mine], [r["answers"] for r in mine], run)
        summary.append({
            "mode": mode, "examples": len(mine),
            "mean_fcs": _mean(r["fcs"] for r in mine),
            "attack_success_rate": outcome_rate(outcomes),
            "counted": sum(o is not None for o in outcomes),
            "mean_delta_norm": _mean(r["delta_norm"] for r in mine),
        })
    table, _ = summary_table(summary)
    ordered = [rows[(e["id"], mode)] for e in examples for mode in run.modes]
    return AttackReport(ordered, summary, table, out / RESULTS_FILE)


def _mean(values) -> Optional[float]:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None

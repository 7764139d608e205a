"""Train an MLLM booster through the frozen language model (the paper's "feature utility").

Why: a booster trained only on feature consistency raises the robustness score S, but what an MLLM user
sees is answers. Here a booster stage is trained on exactly the path ``patch_model`` deploys: per noisy
copy denoise -> vision tower -> projector -> map, unit-normalise, average ``n_copies`` copies, rescale to
the mean norm -> frozen language model. Losses:

* utility: cross-entropy of the accepted answer given the smoothed features (noisy training images);
* identity: the trained stage's relative change of clean inputs (told the level measured on them, ~0),
  so the booster leaves clean inputs unchanged (for a denoiser with an estimated level this is nearly
  free: it already sees ~0 noise there). Boosters told a fixed level (``noise_level="given"``) are
  refused: their clean inputs would be told sigma, and the identity term would fight denoising;
* consistency: 1 - cos(smoothed features, clean features), which is what S and the certificate reward
  (clean features: through the denoiser for the mapper stage, the plain tower for the denoiser stage).

Where the mapper sits: after the projector, on the features the decoder reads. Two stages, one loop
(:func:`_train_utility`):

* ``stage="mapper"``: the vision tower, projector, denoiser and language model are frozen, so the noisy
  tower features are computed once (a bank of ``n_copies`` draws per training image) and training only
  runs the mapper and the language model;
* ``stage="denoiser"``: the pixel-space denoiser is trained through everything downstream, on the
  patched model's own smoothed path (fresh noise every step; identity here is the denoiser leaving
  clean pixels unchanged). Each step costs a backward pass through the tower and the language model;
* ``stage="joint"``: the denoiser and the mapper together on that path, fresh noise every step (no bank);
  identity holds for both (clean pixels through the denoiser, clean features through the mapper), and
  ``stats_weight`` adds the statistics term (per-dimension mean/std of the smoothed features matched to the
  clean ones, :func:`fs_mllm.booster.losses.stats_matching_loss`).

Each stage is a deterministic function of each noisy copy, so certificates of the boosted smoothed
encoder stay sound. Checkpoints are atomic and resumable (:mod:`fs_mllm.booster.checkpoint`'s).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..config import UTILITY_BOOSTER_STEPS, FSConfig
from ..smoothing import rescale_direction, unit_features
from .losses import stats_matching_loss
from .model import GaussianSmoothnessBooster, GSBConfig

__all__ = ["UtilityTrainConfig", "feature_bank", "smoothed_bank_features", "train_mapper_utility", "training_scenes", "write_train_images",
           "train_path_utility", "train_utility_booster"]

STAGES = ("mapper", "denoiser", "joint")
PATH_STAGES = ("denoiser", "joint")  # trained on the patched model's own smoothed path, fresh noise every step


@dataclass
class UtilityTrainConfig:
    """Settings of one utility run (all recorded in the booster's config)."""

    sigma: float = FSConfig.sigma
    n_copies: int = FSConfig.n_samples  # noisy copies averaged per image: the deployed n0
    images: int = 400
    steps: int = UTILITY_BOOSTER_STEPS
    batch_size: int = 4
    lr: float = 1e-3
    identity_weight: float = 1.0
    consistency_weight: float = 1.0
    stats_weight: float = 0.0  # the statistics term (smoothed vs clean features, per dimension); 0: off
    seed: int = 0
    checkpoint_every: int = 50
    stage: str = "mapper"  # which booster stage is trained: "mapper" (after the projector), "denoiser" or "joint" (both)

    def __post_init__(self) -> None:
        from ..arguments import check_float, check_int
        from ..config import check_seed, check_sigma

        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        self.sigma = check_sigma(self.sigma)
        for name in ("n_copies", "images", "steps", "batch_size", "checkpoint_every"):
            check_int(getattr(self, name), name)
        self.seed = check_seed(self.seed)
        self.lr = check_float(self.lr, "lr")
        for name in ("identity_weight", "consistency_weight", "stats_weight"):
            setattr(self, name, check_float(getattr(self, name), name, allow_zero=True))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def feature_bank(model: Any, processor: Any, booster: GaussianSmoothnessBooster, images01: torch.Tensor, n_copies: int,
                 sigma: float, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Decoder-facing features before the mapper: ``noisy`` (N, K, T, D) of K denoised noisy copies per image
    (noise as the patch draws it: std sigma in [0,1] space, unclamped), their told ``levels`` (N, K), and the
    ``clean`` features (N, T, D) with ``clean_levels`` (N,). Stored in float16 to fit in memory."""
    generator = torch.Generator().manual_seed(seed)
    noisy, levels, clean, clean_levels = [], [], [], []
    for image in tqdm(images01, desc="feature bank", unit="image", disable=not progress):
        copies = image.unsqueeze(0) + sigma * torch.randn((n_copies,) + tuple(image.shape), generator=generator)
        level = booster.noise_level(copies, sigma)
        noisy.append(_plain_features(model, processor, booster.denoise(copies, level)).half())
        levels.append(level.float())
        clean_level = booster.noise_level(image.unsqueeze(0), sigma)
        clean.append(_plain_features(model, processor, booster.denoise(image.unsqueeze(0), clean_level))[0].half())
        clean_levels.append(clean_level.float()[0])
    return {"noisy": torch.stack(noisy), "levels": torch.stack(levels), "clean": torch.stack(clean),
            "clean_levels": torch.stack(clean_levels)}


def _plain_features(model: Any, processor: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Features of pixels that may leave [0,1] (noisy copies are fed unclamped, as the patch does)."""
    from ..attacks import image_features
    from ..patching import is_patched

    if is_patched(model):
        raise ValueError("feature_bank needs the unpatched model (it adds the noise itself)")
    return image_features(model, pixels, processor=processor).float()


def smoothed_bank_features(booster: GaussianSmoothnessBooster, noisy: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """What the decoder receives from the patched model, from banked copies (B, K, T, D): map each copy at
    its level, unit-normalise (global), average, rescale to the mean norm -- the deployed smoothing."""
    batch, copies = noisy.shape[:2]
    mapped = booster.map_features(noisy.float().reshape((batch * copies,) + noisy.shape[2:]), levels.reshape(-1))
    unit, norms = unit_features(mapped.reshape((batch, copies) + noisy.shape[2:]), "global", batch_dims=2)
    return rescale_direction(unit.mean(1), norms.mean(1), "global")


def _qa_tokens(tokenizer: Any, prompt: str, answer: str, n_image: int, image_id: int) -> tuple[list[int], list[int]]:
    """Prompt ids with the image tokens expanded, then the answer + <|im_end|>; labels on the answer only."""
    before, after = prompt.split("<image>")
    prompt_ids = tokenizer(before, add_special_tokens=False)["input_ids"] + [image_id] * n_image
    prompt_ids += tokenizer(after, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def answer_loss(model: Any, image_embeds: torch.Tensor, token_rows: Sequence[tuple[list[int], list[int]]], image_id: int) -> torch.Tensor:
    """Mean cross-entropy of the answers given decoder-facing image features (B, T, D), LM frozen."""
    device = image_embeds.device
    length = max(len(ids) for ids, _ in token_rows)
    ids = torch.zeros((len(token_rows), length), dtype=torch.long)
    labels = torch.full((len(token_rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(token_rows), length), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(token_rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
        mask[i, :len(row_ids)] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == image_id).unsqueeze(-1), image_embeds.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    selected = target != -100
    logits = model.lm_head(hidden[:, :-1][selected])
    return torch.nn.functional.cross_entropy(logits.float(), target[selected])


def _train_utility(booster: GaussianSmoothnessBooster, module: torch.nn.Module, batch_losses: Any,
                   train: UtilityTrainConfig, output_dir: Optional[str], progress: bool) -> dict:
    """The one utility training loop: AdamW on ``module`` (the stages being trained), ``batch_losses(step_seed,
    rng) -> {"utility", "identity", "consistency"[, "stats"]: loss terms}`` with ``rng = random.Random(step_seed)``,
    weighted by ``train``, atomic checkpoints it resumes from. Batches and noise are pure functions of the step's seed, so a resumed run replays nothing
    and repeats nothing."""
    from .checkpoint import load_checkpoint_state, save_checkpoint, unflatten_optimizer_state

    optimizer = torch.optim.AdamW(module.parameters(), lr=train.lr, weight_decay=0.0)
    checkpoint = Path(output_dir) / "checkpoint" if output_dir else None
    step, history, previous_seconds = 0, [], 0.0
    resumed = load_checkpoint_state(checkpoint) if checkpoint is not None else None
    if resumed is not None:
        from ..results import describe_changes

        # fields added since: 0.1 stored no stage (it trained the mapper), 0.2 no stats_weight (it had none)
        changed = describe_changes({"stage": "mapper", "stats_weight": 0.0, **resumed.get("train_config", {})}, train.to_dict())
        if changed:
            raise ValueError(f"checkpoint in {str(checkpoint)!r} was made with other settings ({'; '.join(changed)}); "
                             "rerun them or use a new output_dir")
        booster.load_state_dict(GaussianSmoothnessBooster.from_pretrained(resumed["path"]).state_dict())
        optimizer.load_state_dict(unflatten_optimizer_state(resumed["optimizer_tensors"], resumed["optimizer"]))
        step, history, previous_seconds = int(resumed["step"]), list(resumed["history"]), float(resumed.get("seconds", 0.0))
    start = time.time()
    bar = tqdm(total=train.steps, initial=step, desc=f"gsb utility ({train.stage})", disable=not progress)
    booster.train()
    while step < train.steps:
        step_seed = train.seed * 1_000_003 + step
        terms = batch_losses(step_seed, random.Random(step_seed))
        loss = terms["utility"] + train.identity_weight * terms["identity"] + train.consistency_weight * terms["consistency"]
        if "stats" in terms:
            loss = loss + train.stats_weight * terms["stats"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), **{name: term.item() for name, term in terms.items()}})
        bar.update()
        bar.set_postfix(utility=f"{history[-1]['utility']:.3f}", cos=f"{1 - history[-1]['consistency']:.3f}")
        if checkpoint is not None and (step % train.checkpoint_every == 0 or step == train.steps):
            save_checkpoint(checkpoint, booster, optimizer, step, "utility", history,
                            previous_seconds + time.time() - start, train.to_dict())
    bar.close()
    booster.eval()
    return {"steps": step, "seconds_total": previous_seconds + time.time() - start, "history": history}


def _question_rows(rng: random.Random, index: Sequence[int], qa: Sequence[Sequence[tuple[str, list[str]]]], tokenizer: Any,
                   prompt_fn: Any, tokens: int, image_id: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for i in index:
        question, answers = qa[i][rng.randrange(len(qa[i]))]
        rows.append(_qa_tokens(tokenizer, prompt_fn(question), answers[0], tokens, image_id))
    return rows


def _freeze_all_but(model: Any, booster: GaussianSmoothnessBooster, stage: str) -> torch.nn.Module:
    """Freeze the MLLM and the booster except ``stage`` (both parts for "joint"), returned as one module;
    refuse boosters told a fixed noise level."""
    parts = ("denoiser", "mapper") if stage == "joint" else (stage,)
    for part in parts:
        if getattr(booster, part) is None:
            raise ValueError(f"booster has no {part} to train (GSBConfig(use_{part}=True))")
    module = getattr(booster, stage) if len(parts) == 1 else torch.nn.ModuleList([booster.denoiser, booster.mapper])
    if booster.config.noise_level == "given":
        raise ValueError("booster: utility training needs noise_level='estimated' (told 'given', clean images would be "
                         "told sigma and the identity term would fight denoising); train one with --noise-level estimated")
    for part in (model, booster):
        part.requires_grad_(False)
    module.requires_grad_(True)
    model.eval()
    return module


def _consistency(smoothed: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return (1 - torch.nn.functional.cosine_similarity(smoothed.flatten(1), clean.flatten(1), dim=1)).mean()


def _mapper_identity(booster: GaussianSmoothnessBooster, clean: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The mapper's relative squared change of clean features (B, T, D), told ``levels`` (B,)."""
    residual = booster.mapper.residual(clean, levels)
    return (residual.pow(2).flatten(1).sum(1) / clean.pow(2).flatten(1).sum(1)).mean()


def _loss_terms(train: UtilityTrainConfig, utility: torch.Tensor, identity: torch.Tensor, smoothed: torch.Tensor,
                clean: torch.Tensor) -> dict[str, torch.Tensor]:
    """A step's loss terms (what :func:`_train_utility` weighs and logs); the statistics term only when weighted."""
    terms = {"utility": utility, "identity": identity, "consistency": _consistency(smoothed.float(), clean)}
    return {**terms, "stats": stats_matching_loss(smoothed, clean)} if train.stats_weight > 0 else terms


def train_mapper_utility(model: Any, tokenizer: Any, booster: GaussianSmoothnessBooster, bank: dict[str, torch.Tensor],
                         qa: Sequence[Sequence[tuple[str, list[str]]]], prompt_fn: Any, image_id: int,
                         train: UtilityTrainConfig, output_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Train ``booster.mapper`` (everything else frozen) for ``train.steps`` steps; resumes from
    ``output_dir``/checkpoint. ``qa[i]`` lists (question, accepted answers) of bank image i."""
    mapper = _freeze_all_but(model, booster, "mapper")
    n_images, tokens = bank["noisy"].shape[0], bank["noisy"].shape[2]

    def batch_losses(step_seed: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = [rng.randrange(n_images) for _ in range(train.batch_size)]
        rows = _question_rows(rng, index, qa, tokenizer, prompt_fn, tokens, image_id)
        smoothed = smoothed_bank_features(booster, bank["noisy"][index], bank["levels"][index])
        clean = bank["clean"][index].float()
        identity = _mapper_identity(booster, clean, bank["clean_levels"][index])
        return _loss_terms(train, answer_loss(model, smoothed, rows, image_id), identity, smoothed, clean)

    return _train_utility(booster, mapper, batch_losses, train, output_dir, progress)


def train_path_utility(model: Any, processor: Any, booster: GaussianSmoothnessBooster, images01: torch.Tensor,
                       qa: Sequence[Sequence[tuple[str, list[str]]]], prompt_fn: Any, image_id: int,
                       train: UtilityTrainConfig, output_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Train ``booster.denoiser`` (``train.stage="denoiser"``) or the denoiser and the mapper together ("joint")
    through the frozen tower, projector and language model, on the smoothed path ``patch_model`` deploys
    (``train.n_copies`` noisy copies per image, fresh noise every step: the step is the noise seed). ``model``
    must be unpatched; it is patched for training and unpatched after. Identity: relative squared change of clean
    pixels through the denoiser (told the level measured on them, ~0), plus, for "joint", of clean features
    through the mapper."""
    from ..adapters import get_adapter
    from ..attacks import image_features, noise_seed
    from ..patching import is_patched, patch_model, unpatch_model

    if is_patched(model):
        raise ValueError("train_path_utility needs the unpatched model (it patches it with the booster itself)")
    if train.stage not in PATH_STAGES:
        raise ValueError(f"train_path_utility trains the stages {PATH_STAGES} on the smoothed path, got stage={train.stage!r} "
                         "(the mapper alone trains on a feature bank: train_mapper_utility)")
    trained = _freeze_all_but(model, booster, train.stage)
    # another feature size or a sigma outside the booster's range fails before any work
    booster.check_compatible(get_adapter(model).feature_dim(model), train.sigma)
    with torch.no_grad():
        clean = torch.cat([image_features(model, images01[i:i + 16], processor=processor).float()
                           for i in range(0, images01.shape[0], 16)])
    tokens = clean.shape[1]
    patch_model(model, sigma=train.sigma, n_samples=train.n_copies, processor=processor, booster=booster)

    def batch_losses(step_seed: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = [rng.randrange(images01.shape[0]) for _ in range(train.batch_size)]
        rows = _question_rows(rng, index, qa, processor.tokenizer, prompt_fn, tokens, image_id)
        pixels = images01[index]
        with noise_seed(model, step_seed):  # fresh noise every step
            smoothed = image_features(model, pixels, processor=processor)
        clean_level = booster.noise_level(pixels, train.sigma)
        denoised = booster.denoise(pixels, clean_level)
        identity = ((denoised - pixels).pow(2).flatten(1).sum(1) / pixels.pow(2).flatten(1).sum(1).clamp_min(1e-6)).mean()
        if train.stage == "joint":
            # the mapper's identity on the clean features themselves, not on the features of denoise(clean) that
            # it receives (the mapper stage's bank, with its denoiser frozen): the pixel identity above pulls
            # denoise(clean) to clean, and this costs no extra tower forward per step
            identity = identity + _mapper_identity(booster, clean[index], clean_level)
        return _loss_terms(train, answer_loss(model, smoothed, rows, image_id), identity, smoothed, clean[index])

    try:
        return _train_utility(booster, trained, batch_losses, train, output_dir, progress)
    finally:
        unpatch_model(model)


def with_mapper(booster: GaussianSmoothnessBooster, feature_dim: int, encoder_id: str) -> GaussianSmoothnessBooster:
    """A copy of ``booster`` (its denoiser weights) with a fresh identity-initialised mapper for ``feature_dim``."""
    config = GSBConfig.from_dict({**booster.config.to_dict(), "use_mapper": True, "feature_dim": feature_dim,
                                  "encoder_id": encoder_id})
    boosted = GaussianSmoothnessBooster(config)
    if booster.denoiser is not None:
        boosted.denoiser.load_state_dict(booster.denoiser.state_dict())
    return boosted


def training_scenes(n_images: int, seed: int = 0) -> list:
    """fs-mini-llava's booster training scenes: the synthetic *training* split (never the held-out one that
    every accuracy figure is measured on), stream ``seed + 1``, at the model's image size."""
    from ..models.mini_llava import IMAGE_SIZE
    from ..synthetic import make_dataset

    return make_dataset(n_images, split="train", seed=seed + 1, size=IMAGE_SIZE)


def write_train_images(folder: str | Path, synthetic: int = 800, seed: int = 0) -> Path:
    """The shipped booster's image folder for ``fs-mllm train-gsb``, as PNG: ``synthetic`` training scenes
    (:func:`training_scenes`, the ones the utility stage trains on) plus the DINOv2 booster's training photos."""
    from PIL import Image

    from ..image_io import offline_photo
    from .data import TRAIN_PHOTOS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, example in enumerate(training_scenes(synthetic, seed)):
        example.image.save(folder / f"synth_{i:04d}.png")
    for name in TRAIN_PHOTOS:
        Image.fromarray(offline_photo(name)).save(folder / f"photo_{name}.png")
    return folder


def train_utility_booster(train: UtilityTrainConfig, output_dir: Union[str, os.PathLike], *, init: Optional[Union[str, os.PathLike]] = None,
                          save_to: Optional[Union[str, os.PathLike]] = None, recipe: Optional[str] = None) -> dict:
    """Train a stage of fs-mini-llava's booster through the frozen language model and save the booster:
    the mapper (``train.stage="mapper"``; the denoiser is kept from ``init``), the denoiser, or both together
    (``"joint"``; an ``init`` without a mapper gets a fresh identity-initialised one).

    ``init``: the booster to start from (default: the shipped one). ``output_dir`` holds the checkpoints
    (and the mapper stage's feature bank): the same call again resumes. ``save_to``: where the trained
    booster goes (default ``output_dir/booster``). ``recipe``: how the run was started, recorded in the
    booster's config beside its settings (default: this call). Returns the run's record, ``saved`` included.
    """
    from ..image_io import to_tensor01
    from ..models import load_mini_llava
    from ..models.mini_llava import BOOSTER_DIR, IMAGE_SIZE, IMAGE_TOKEN, build_prompt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load_mini_llava()
    shipped = GaussianSmoothnessBooster.from_pretrained(init or BOOSTER_DIR).eval()
    examples = training_scenes(train.images, train.seed)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if train.stage in PATH_STAGES:
        booster, bank_seconds = shipped, None
        if train.stage == "joint" and shipped.mapper is None:
            booster = with_mapper(shipped, shipped.config.feature_dim, shipped.config.encoder_id or "fs-mini-llava/projector")
        images = torch.stack([to_tensor01(e.image, IMAGE_SIZE) for e in examples])
        result = train_path_utility(model, processor, booster, images, [e.qa for e in examples], build_prompt,
                                    image_id, train, output_dir=str(out))
        note = (f"{'denoiser and mapper' if train.stage == 'joint' else 'denoiser'} fine-tuned through the frozen "
                "DINOv2 tower, projector and SmolLM2 on answers of noisy synthetic training images, fresh noise every "
                f"step (fs_mllm.booster.through_lm, stage {train.stage})")
    else:
        booster = with_mapper(shipped, shipped.config.feature_dim, shipped.config.encoder_id or "fs-mini-llava/projector")
        bank, bank_seconds = _load_or_build_bank(out / "bank.safetensors", model, processor, booster, examples, train, IMAGE_SIZE, to_tensor01)
        result = train_mapper_utility(model, processor.tokenizer, booster, bank, [e.qa for e in examples], build_prompt,
                                      image_id, train, output_dir=str(out))
        note = ("denoiser from the DINOv2 booster; mapper after the projector, trained through the frozen SmolLM2 on "
                "answers of noisy synthetic training images (fs_mllm.booster.through_lm)")
    extra = dict(shipped.config.extra)
    runs = list(extra.get("finetune_runs", []))  # one record per run, the shipped booster's included
    runs.append({"step": f"utility fine-tune of the {train.stage} through the frozen language model",
                 "recipe": recipe or f"fs_mllm.booster.through_lm.train_utility_booster(stage={train.stage!r})",
                 "train_config": train.to_dict(), "seconds_training": round(result["seconds_total"], 1),
                 "device": f"cpu, {torch.get_num_threads()} torch thread(s)", "final": result["history"][-1] if result["history"] else None,
                 **({"seconds_bank": round(bank_seconds, 1)} if train.stage == "mapper" else {})})
    extra.update({"finetune_runs": runs, "note": note})
    booster.config.extra = extra
    saved = Path(save_to or out / "booster")
    booster.save_pretrained(saved)
    return {"saved": str(saved), **runs[-1]}


def _load_or_build_bank(bank_path: Path, model: Any, processor: Any, booster: GaussianSmoothnessBooster,
                        examples: Sequence[Any], train: UtilityTrainConfig, size: int, to_tensor01: Any) -> tuple[dict[str, torch.Tensor], float]:
    """The mapper stage's feature bank, saved atomically beside the checkpoints and reused on resume."""
    start = time.time()
    if bank_path.is_file():
        from safetensors.torch import load_file

        bank = load_file(str(bank_path))
    else:
        from safetensors.torch import save_file

        images = torch.stack([to_tensor01(e.image, size) for e in examples])
        bank = feature_bank(model, processor, booster, images, train.n_copies, train.sigma, train.seed)
        partial = bank_path.with_name(bank_path.stem + ".tmp.safetensors")
        save_file(bank, str(partial))
        partial.replace(bank_path)
    return bank, time.time() - start

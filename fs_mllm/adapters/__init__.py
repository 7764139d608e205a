"""One adapter per model family (keyed by ``config.model_type``); see :mod:`fs_mllm.adapters.base`.

Importing this package registers every family: llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, paligemma,
gemma3, mistral3.
Dual encoders (no generate(); zero-shot classification): clip, metaclip_2, altclip, chinese_clip, siglip, align, siglip2.
"""

from . import gemma3, llava, llava_next, llava_onevision, mistral3, paligemma, qwen2_vl  # noqa: F401  (register adapters)
from . import dual_encoders  # noqa: F401  (register the dual-encoder adapters)
from .base import ADAPTERS, Booster, FamilyAdapter, get_adapter, supported_model_types, unwrap_model

__all__ = ["ADAPTERS", "Booster", "FamilyAdapter", "get_adapter", "supported_model_types", "unwrap_model"]

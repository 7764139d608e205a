"""One adapter per model family (keyed by ``config.model_type``); see :mod:`fs_mllm.adapters.base`.

Importing this package registers every family (``supported_model_types()`` lists them;
``family_table()`` is the README's table) and records the families refused with a reason.
Dual encoders (no generate(); zero-shot classification): clip, metaclip_2, altclip, chinese_clip, siglip, align, siglip2.
"""

from . import (  # noqa: F401  (register adapters)
    dual_encoders, gemma3, gemma4, idefics, kimi_k25, lfm2_vl, llava, llava_next, llava_onevision, mistral3, mllama,
    paligemma, plain, qwen2_vl, refused,
)
from .base import (
    ADAPTERS, REFUSED, Booster, FamilyAdapter, family_table, get_adapter, supported_model_types, unwrap_model,
)

__all__ = ["ADAPTERS", "REFUSED", "Booster", "FamilyAdapter", "family_table", "get_adapter", "supported_model_types",
           "unwrap_model"]

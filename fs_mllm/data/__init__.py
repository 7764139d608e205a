"""Data shipped with fs_mllm.

``offline_eval/annotations.jsonl`` holds the project's own captions and VQAv2-style questions for
real photos that come with installed packages (scikit-image, scikit-learn, matplotlib), so a real
evaluation runs with no network. The image bytes are not copied; they are loaded from those
packages by :func:`fs_mllm.evaluation.datasets.load_offline_eval`.
"""

from __future__ import annotations

import os

OFFLINE_EVAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offline_eval")
OFFLINE_EVAL_ANNOTATIONS = os.path.join(OFFLINE_EVAL_DIR, "annotations.jsonl")

__all__ = ["OFFLINE_EVAL_DIR", "OFFLINE_EVAL_ANNOTATIONS"]

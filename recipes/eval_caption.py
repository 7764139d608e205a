"""Captioning robustness evaluation (CIDEr, BLEU-4, ROUGE-L): base vs FS vs FS+GSB, clean and attacked.

Runs out of the box on the embedded offline model and eval set:

    python recipes/eval_caption.py --output-dir runs/caption --limit 8 --attack-eps 0.5 --certify-n 100
    accelerate launch --num_processes 2 recipes/eval_caption.py --output-dir runs/caption ...   # sharded

Kill it and rerun the same command to resume (results.rank*.jsonl are append-only; a rerun with other
settings into the same folder is refused). Caption metrics are corpus-level (CIDEr's IDF comes from the
reference set), so they are computed over the whole set at summary time, with the pure-Python
tokenizer and without METEOR (no JVM start). The logic lives in fs_mllm.evaluation.runner.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fs_mllm.evaluation.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("caption", description=__doc__))

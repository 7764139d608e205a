"""VQA robustness evaluation: base vs FS vs FS+GSB, clean and under attack, with certified FCSB curves.

Runs out of the box on the embedded offline model and eval set:

    python recipes/eval_vqa.py --output-dir runs/vqa --limit 8 --attack-eps 0.5 1.0 --certify-n 100
    accelerate launch --num_processes 2 recipes/eval_vqa.py --output-dir runs/vqa ...   # sharded

Kill it and rerun the same command to resume (results.rank*.jsonl are append-only; a rerun with other
settings into the same folder is refused). Outputs: summary.md, summary.json, certified_curve.png,
accuracy_vs_budget.png. The logic lives in fs_mllm.evaluation.runner.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fs_mllm.evaluation.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("vqa", description=__doc__))

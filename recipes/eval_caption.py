"""Captioning robustness evaluation (CIDEr, BLEU-4, ROUGE-L): ``fs-mllm eval caption`` as a script.

    python recipes/eval_caption.py --output-dir runs/caption --limit 8 --attack-eps 0.5 --certify-n 100
    accelerate launch --num_processes 2 recipes/eval_caption.py --output-dir runs/caption ...   # sharded

The options and the logic live in fs_mllm.evaluation.runner (``--help`` lists them).
"""

import sys

from fs_mllm.evaluation.runner import main

if __name__ == "__main__":
    sys.exit(main("caption", sys.argv[1:]))

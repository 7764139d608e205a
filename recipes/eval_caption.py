"""Captioning robustness evaluation (CIDEr, BLEU-4, ROUGE-L): ``fs-mllm eval caption`` as a script.

    python recipes/eval_caption.py --output-dir runs/caption --limit 8 --attack-eps 0.5 --certify-n 100
    accelerate launch --num_processes 2 recipes/eval_caption.py --output-dir runs/caption ...   # sharded

The options live in fs_mllm.commands.eval (``--help`` lists them), the logic in fs_mllm.evaluation.runner.
"""

import sys

from fs_mllm.commands.eval import main

if __name__ == "__main__":
    sys.exit(main("caption", sys.argv[1:]))

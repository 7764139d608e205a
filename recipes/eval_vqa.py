"""VQA robustness evaluation (base vs FS vs FS+GSB, clean and attacked): ``fs-mllm eval vqa`` as a script.

    python recipes/eval_vqa.py --output-dir runs/vqa --limit 8 --attack-eps 0.5 1.0 --certify-n 100
    accelerate launch --num_processes 2 recipes/eval_vqa.py --output-dir runs/vqa ...   # sharded

The options live in fs_mllm.commands.eval (``--help`` lists them), the logic in fs_mllm.evaluation.runner.
"""

import sys

from fs_mllm.commands.eval import main

if __name__ == "__main__":
    sys.exit(main("vqa", sys.argv[1:]))

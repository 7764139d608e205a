"""PGD attacks on the full pipeline (base, FS, FS+GSB): ``fs-mllm attack`` as a script.

    python recipes/attack_pipeline.py --offline-eval vqa --limit 8 --eps 0.5 --out runs/attack

The options live in fs_mllm.commands.attack (``--help`` lists them), the logic in fs_mllm.evaluation.attack_pipeline.
"""

import sys

from fs_mllm.commands.attack import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

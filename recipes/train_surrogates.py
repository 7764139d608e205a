"""Retrain the shipped surrogate encoders of the transfer protocol (fs_mllm.surrogate_training) on the synthetic task.

    OMP_NUM_THREADS=1 python recipes/train_surrogates.py [OUT]   # default: fs_mllm/weights/surrogates

The architectures, seeds and training settings live in fs_mllm.surrogate_training.SPECS.
"""

import sys

from fs_mllm.surrogate_training import train_shipped_surrogates

if __name__ == "__main__":
    train_shipped_surrogates(sys.argv[1] if len(sys.argv) > 1 else None)

"""Benchmarks run the Triton kernels through the interpreter where there is no GPU.

TRITON_INTERPRET must be set before triton is first imported; conftest.py is loaded
before the benchmark modules, so it is set here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

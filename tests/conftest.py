"""Triton kernels (ringlinear.ops.lightning, ops.fp8) run in the interpreter on the CPU: set before triton is
imported (only when no GPU is present, so `pytest -m gpu` on the device runs the compiled kernels)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

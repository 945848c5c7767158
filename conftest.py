"""Test-wide setup, loaded before any test module imports triton.

Without CUDA, Triton kernels run through the Triton interpreter, which must be switched on
before triton is first imported. Set TRITON_INTERPRET=0 explicitly to opt out.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

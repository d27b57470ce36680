"""Where the kernels run: the CUDA GPU if there is one, else the CPU (Triton interpreter)."""

import os

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (no bit-exact fp8 rounding there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"

"""Parameter tables and ids the quantiser suites share (dtypes, shape and dtype ids)."""

from __future__ import annotations

import torch

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FLOAT_DTYPES = (BF16, FP16, FP32)  # what every quantiser takes


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()

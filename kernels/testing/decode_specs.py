"""Decode-kernel cases checked against the float64 reference: small ragged ones the CPU
interpreter runs, and lab-sized gpt-oss ones for the GPU (shared by the kernel tests and the
tuning script, which re-checks them under other launch parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvperf_kernels.attention.decode import MAX_SPLITS

E4M3FNUZ = getattr(torch, "float8_e4m3fnuz", None)


@dataclass(frozen=True)
class Spec:
    lens: tuple[int, ...]
    hq: int
    hkv: int
    head_dim: int
    page_size: int
    kv_dtype: torch.dtype
    granularity: str | None = None
    sinks: bool = True
    window_left: int = -1
    num_splits: int | None = 1
    q_dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        kv = str(self.kv_dtype).removeprefix("torch.")
        gran = f"-{self.granularity}" if self.granularity else ""
        q = "" if self.q_dtype == torch.bfloat16 else f"-q{str(self.q_dtype)[6:]}"
        return (
            f"{kv}{gran}{q}-d{self.head_dim}-p{self.page_size}-h{self.hq}x{self.hkv}"
            f"-{'sinks' if self.sinks else 'nosinks'}"
            f"{f'-win{self.window_left}' if self.window_left >= 0 else ''}-split{self.num_splits}"
        )


RAGGED = (1, 17, 100)  # one token, a page and a bit, several pages with a ragged tail
RAGGED_D128 = (3, 70, 129)
BF16, FP16, E4M3 = torch.bfloat16, torch.float16, torch.float8_e4m3fn

CPU_SPECS = [
    Spec(RAGGED, 8, 2, 64, 16, BF16),
    Spec(RAGGED, 8, 2, 64, 16, BF16, num_splits=3),
    Spec(RAGGED, 8, 2, 64, 16, BF16, sinks=False, window_left=24, num_splits=2),
    Spec(RAGGED, 8, 2, 64, 16, BF16, window_left=0, num_splits=2),  # current token only
    Spec(RAGGED_D128, 4, 2, 128, 64, BF16, window_left=24),
    Spec(RAGGED_D128, 2, 2, 128, 64, FP16, sinks=False, num_splits=3, q_dtype=FP16),
    Spec(RAGGED, 16, 2, 64, 16, E4M3, "per_tensor"),
    Spec(RAGGED, 16, 2, 64, 16, E4M3, "per_tensor", window_left=24, num_splits=4),
    Spec(RAGGED, 16, 2, 64, 64, E4M3, "per_token", sinks=False, num_splits=2),
    Spec(RAGGED_D128, 8, 2, 128, 16, E4M3, "per_token", window_left=24, num_splits=3),
    Spec(RAGGED, 8, 2, 64, 16, E4M3, "per_token", q_dtype=FP16),
]
if E4M3FNUZ is not None:
    CPU_SPECS += [
        Spec(RAGGED, 8, 2, 64, 16, E4M3FNUZ, "per_tensor", num_splits=2),
        Spec(RAGGED, 8, 2, 64, 16, E4M3FNUZ, "per_token", window_left=24),
    ]

# gpt-oss decode: Hq 64, Hkv 8, D 64, page 16, full attention and the 128-token window.
_GPT_OSS = dict(hq=64, hkv=8, head_dim=64, page_size=16)
_LONG_RAGGED = (32768, 1, 20001, 4097)
_BATCH64 = tuple(8192 - 97 * i for i in range(64))
GPU_SPECS = [
    Spec((128, 1024, 77, 1000), **_GPT_OSS, kv_dtype=BF16, num_splits=None),
    Spec((128, 1024, 77, 1000), **_GPT_OSS, kv_dtype=E4M3, granularity="per_tensor",
         num_splits=None),
    Spec(_LONG_RAGGED, **_GPT_OSS, kv_dtype=E4M3, granularity="per_token", num_splits=None),
    Spec(_LONG_RAGGED, **_GPT_OSS, kv_dtype=E4M3, granularity="per_tensor", window_left=127,
         num_splits=None),
    Spec(_LONG_RAGGED, **_GPT_OSS, kv_dtype=BF16, num_splits=MAX_SPLITS),
    Spec(_BATCH64, **_GPT_OSS, kv_dtype=E4M3, granularity="per_tensor", num_splits=None),
    Spec(_BATCH64, **_GPT_OSS, kv_dtype=BF16, window_left=127, num_splits=3),
    Spec((4000, 9000, 1), 32, 4, 128, 64, E4M3, "per_token", num_splits=None),
]

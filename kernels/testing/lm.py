"""What the LM suite shares: memoised SmolLM2 runs per KV configuration, the drift metrics,
and the fault injections of its controls.

A run is keyed by (KV configuration, what is run, attention backend, control) and computed
once per session: several tests read the same BF16 baseline and each format's run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvperf_kernels.models import llama
from kvperf_kernels.models.paged_formats import PagedStore

CONTROLS = ("lost_scales", "swapped_kv_layer")
# faults in the kernel's reads only: controls of the kernel-beside-reference check
KERNEL_CONTROLS = ("kernel_lost_v_scale",)
SWAPPED_LAYER = 15  # the control's layer: the middle of the 30


def check_finite(t: torch.Tensor, what: str) -> None:
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise AssertionError(f"{what}: {bad} NaN/Inf of {t.numel()} values")


@dataclass(frozen=True)
class Drift:
    """Teacher-forced logits of a run against a reference run on the same tokens."""

    rel_l2: float  # ||l - l_ref|| / ||l_ref|| over all positions
    max_abs: float
    mean_kl: float  # mean over positions of KL(p_ref || p), nats
    top1_agreement: float  # fraction of positions with the same argmax

    @classmethod
    def of(cls, logits: torch.Tensor, ref: torch.Tensor, *, rows: int = 256) -> Drift:
        """Over [T, V] logits, ``rows`` positions at a time in float32 (the log-softmax of a
        whole 2K x 49K float64 copy cost seconds more than the run it measures)."""
        check_finite(logits, "logits")
        check_finite(ref, "reference logits")
        if logits.shape != ref.shape:
            raise ValueError(f"shapes differ: {tuple(logits.shape)} vs {tuple(ref.shape)}")
        a_all, b_all = logits.reshape(-1, logits.shape[-1]), ref.reshape(-1, ref.shape[-1])
        sq_diff = sq_ref = kl = 0.0
        max_abs, same = 0.0, 0
        for i in range(0, a_all.shape[0], rows):
            a, b = a_all[i:i + rows].float(), b_all[i:i + rows].float()
            diff = a - b
            sq_diff += diff.double().pow(2).sum().item()
            sq_ref += b.double().pow(2).sum().item()
            max_abs = max(max_abs, diff.abs().max().item())
            lp_ref, lp = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
            kl += (lp_ref.exp() * (lp_ref - lp)).sum(-1).double().sum().item()
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
        n = a_all.shape[0]
        return cls(math.sqrt(sq_diff / sq_ref), max_abs, kl / n, same / n)


# --------------------------------------------------------------------------------------
# Controls (fault injections that the thresholds must catch)
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def lost_scales() -> Iterator[None]:
    """Every FP8 store read without its scales (codes taken as values, scale 1): a kernel
    that drops k_scale / v_scale. BF16 and the block formats are left as they are."""
    orig_dequantize, orig_scale = PagedStore.dequantize, PagedStore.kernel_scale

    def dequantize(self, index=None, *, dtype=torch.float32, kernels=False):
        if not self.fmt.startswith("fp8_"):
            return orig_dequantize(self, index, dtype=dtype, kernels=kernels)
        q = self.tensors["q"]
        if index is not None:
            q = q.view(-1, *q.shape[2:]).view(torch.uint8)[index].view(q.dtype)
        return q.to(dtype)

    def kernel_scale(self):
        return None if self.fmt.startswith("fp8_") else orig_scale(self)

    PagedStore.dequantize, PagedStore.kernel_scale = dequantize, kernel_scale
    try:
        yield
    finally:
        PagedStore.dequantize, PagedStore.kernel_scale = orig_dequantize, orig_scale


@contextlib.contextmanager
def swapped_kv_layer(layer: int = SWAPPED_LAYER) -> Iterator[None]:
    """Layer ``layer`` attends with its K and V stores swapped (written right, read crossed):
    a page-table or pointer mix-up confined to one layer of thirty."""
    orig = llama.Llama._attend

    def attend(self, i, q, pos, valid, lens_after, cache, attention):
        if i != layer:
            return orig(self, i, q, pos, valid, lens_after, cache, attention)
        k_store, v_store = cache.layers[i]
        cache.layers[i] = (v_store, k_store)
        try:
            return orig(self, i, q, pos, valid, lens_after, cache, attention)
        finally:
            cache.layers[i] = (k_store, v_store)

    llama.Llama._attend = attend
    try:
        yield
    finally:
        llama.Llama._attend = orig


@dataclass(frozen=True)
class LayerAgreement:
    """One layer's attention output, our kernel against the reference path, on one forward's
    queries and the same cache bytes (the valid rows only)."""

    layer: int
    rel_l2: float
    max_abs: float


@contextlib.contextmanager
def kernel_beside_reference(records: list[LayerAgreement]) -> Iterator[None]:
    """The reference path, with our Triton kernel run beside it at every layer on the same
    queries and cache: appends each layer's agreement to ``records``. This isolates what the
    kernel contributes: two end-to-end runs of a 30-layer model on different paths drift
    apart far beyond the kernel's arithmetic, because a last-bit difference in one layer
    flips some of the next layers' quantised K/V codes (an E4M3 step is 6 %), and so on
    (seen on the H200: BF16 KV logits 1 % apart, FP8 4-6 %, NVFP4 15 %)."""
    orig = llama.Llama._attend

    def attend(self, i, q, pos, valid, lens_after, cache, attention):
        out = orig(self, i, q, pos, valid, lens_after, cache, attention)
        if attention == "reference":
            if not cache.native:
                raise ValueError(f"{cache.kv_config}: the kernel cannot read this cache")
            k_store, v_store = cache.layers[i]
            ker = self._attend_kernel(q, pos, valid, cache, k_store, v_store)
            a, b = ker[valid].double(), out[valid].double()
            check_finite(a, f"layer {i} kernel attention")
            records.append(LayerAgreement(i, float((a - b).norm() / b.norm()),
                                          float((a - b).abs().max())))
        return out

    llama.Llama._attend = attend
    try:
        yield
    finally:
        llama.Llama._attend = orig


@contextlib.contextmanager
def kernel_lost_v_scale() -> Iterator[None]:
    """Only the kernel's reads lose V's scales (the reference keeps them): a launcher that
    drops v_scale. The control of ``kernel_beside_reference``'s tolerance."""
    orig = PagedStore.kernel_args

    def kernel_args(self, side):
        args = orig(self, side)
        if side == "v":
            args.pop("v_scale", None)
        return args

    PagedStore.kernel_args = kernel_args
    try:
        yield
    finally:
        PagedStore.kernel_args = orig


def control_context(control: str | None):
    if control is None:
        return contextlib.nullcontext()
    if control == "lost_scales":
        return lost_scales()
    if control == "swapped_kv_layer":
        return swapped_kv_layer()
    if control == "kernel_lost_v_scale":
        return kernel_lost_v_scale()
    raise ValueError(f"unknown control {control!r}; known: {CONTROLS + KERNEL_CONTROLS}")


# --------------------------------------------------------------------------------------
# Memoised runs
# --------------------------------------------------------------------------------------

@dataclass
class PerplexityRun:
    perplexity: float
    nll: torch.Tensor  # [T-1] float64 on the CPU
    logits: torch.Tensor  # [T, V] float32 on the model's device
    bytes_per_token: float
    saturated: int


class LMRuns:
    """Session memo of teacher-forced and greedy runs of one model."""

    def __init__(self, model: llama.Llama, text_tokens: list[int], prompts: list[list[int]],
                 *, fp32_model: llama.Llama | None = None):
        self.model, self.text_tokens, self.prompts = model, text_tokens, prompts
        self.fp32_model = fp32_model
        self._ppl: dict = {}
        self._greedy: dict = {}

    def perplexity(self, kv_config: str, n_tokens: int, attention: str, *,
                   control: str | None = None, chunk: int = 512) -> PerplexityRun:
        key = (kv_config, n_tokens, attention, control, chunk)
        if key not in self._ppl:
            if n_tokens > len(self.text_tokens):
                raise ValueError(f"{n_tokens} tokens asked, the text has "
                                 f"{len(self.text_tokens)}")
            with control_context(control):
                r = llama.teacher_forced(self.model, self.text_tokens[:n_tokens], kv_config,
                                         attention=attention, chunk=chunk)
            check_finite(r.logits, f"{kv_config} logits")
            self._ppl[key] = PerplexityRun(r.perplexity, r.nll.cpu(), r.logits,
                                           r.cache.bytes_per_token(), r.cache.saturated)
        return self._ppl[key]

    def kernel_agreement(self, kv_config: str, n_tokens: int, *, control: str | None = None,
                         chunk: int = 512, layers: int | None = None) -> list[LayerAgreement]:
        """Every layer's kernel-vs-reference agreement over a teacher-forced run of the text's
        first ``n_tokens`` (the reference path's run, the kernel beside it); ``layers``: of
        the model's first layers only (the interpreter's size)."""
        key = ("agreement", kv_config, n_tokens, control, chunk, layers)
        if key not in self._ppl:
            records: list[LayerAgreement] = []
            with control_context(control), kernel_beside_reference(records):
                model = self.model if layers is None else self.model.truncated(layers)
                llama.teacher_forced(model, self.text_tokens[:n_tokens], kv_config,
                                     attention="reference", chunk=chunk)
            self._ppl[key] = records
        return self._ppl[key]

    def reference_perplexity(self, n_tokens: int, *, fp32: bool = False) -> PerplexityRun:
        """The no-cache forward (float32 attention, no cache) on the same tokens: of the runs'
        model, or of the float32 model (``fp32``)."""
        key = ("no_cache", n_tokens, fp32)
        if key not in self._ppl:
            ids = torch.tensor(self.text_tokens[:n_tokens])
            model = self.fp32_model if fp32 else self.model
            if model is None:
                raise ValueError("no float32 model given")
            logits = model.forward(ids[None])[0]
            check_finite(logits, "fp32 logits")
            nll = llama.nll_of(logits, ids).cpu()
            self._ppl[key] = PerplexityRun(math.exp(nll.mean().item()), nll, logits, 0.0, 0)
        return self._ppl[key]

    def greedy(self, kv_config: str, prompts_key: str, prompts: list[list[int]],
               new_tokens: int, attention: str, *, control: str | None = None,
               prefill_chunk: int = 1024) -> llama.GreedyResult:
        key = (kv_config, prompts_key, new_tokens, attention, control)
        if key not in self._greedy:
            with control_context(control):
                r = llama.greedy(self.model, prompts, new_tokens, kv_config,
                                 attention=attention, prefill_chunk=prefill_chunk)
            self._greedy[key] = r
        return self._greedy[key]

"""A paged KV cache in any of the project's KV formats, for a real model's decode and prefill.

One layer's K (or V) lives in pages ``[num_pages, page_size, Hkv, ...]`` (the layout of
``cache.paged_kv``): the format's codes and, beside them at the same (page, slot, head),
its scales. Writing quantises the new token vectors with the project's quantisers
(``quant.fp8``, ``quant.mxfp8``, ``quant.nvfp4``): the Triton kernels where the tensors
are on a GPU, their torch references elsewhere (bit-exact with the kernels by those
modules' contracts; the CPU interpreter would take minutes per layer).

Formats (``STORE_FORMATS``; the names of ``cache.kv_memory`` where they exist):

===================  ====================================  ======================  =======
format               stored per (token, head)              scale                    read by
===================  ====================================  ======================  =======
bf16                 D bf16                                none                     kernel
fp8_per_tensor       D e4m3                                one fp32 per layer K|V   kernel
fp8_per_token        D e4m3 + fp32                         amax/448 per head row    kernel
fp8_per_block64      D e4m3 + fp32 per 64 (here: 1)        amax/448 per 64          kernel
mxfp8                D e4m3 + D/32 E8M0                    power of two per 32      kernel
nvfp4                D/2 bytes (E2M1 pairs) + D/16 e4m3    per 16, + fp32 global    kernel
===================  ====================================  ======================  =======

``fp8_per_block64``: the lab's "1x128 block" FP8 (DeepSeek-style 1 x B tiles along the
hidden dim) does not fit a 64-element head: a block may not straddle two heads (each head
is attended separately and the cache is addressed per head), and a token's 3 x 64 = 192
elements are not a multiple of 128 either. So the block is clamped to the head: 1 x 64,
``quant.fp8.quantize_per_block(x, block=64)``, one fp32 scale per (token, head). That is the
per-token rule on the same group, so its bytes equal ``fp8_per_token``'s (the suite asserts
it on the model's K/V); the row is kept so that a block-path bug cannot hide.

Static scales: a per-tensor FP8 scale and the NVFP4 global amax are fixed by the first write
(the prefill, or the first chunk of a teacher-forced text: vLLM's ``calculate_kv_scales``),
and later tokens are quantised with them, saturating (counted in ``saturated``). Every
block or per-token scale is computed as its tokens are written.

"kernel": ``attention.decode.paged_decode_attention`` reads the stored bytes of every format
(``kernel_args``), K and V in different formats too (K FP8 + V NVFP4); MXFP8 and NVFP4 were
dequantised to BF16 and then attended before the fused kernel (issue 17), and the torch
reference path still reads them as BF16 values (``BF16_READBACK``), as it did then.

Unused slots hold NaN codes or NaN scales (``nan_fill``), so a read past a sequence's
length shows as NaN in the output.
"""

from __future__ import annotations

import torch

from kvperf_kernels.cache.kv_memory import stored_bytes
from kvperf_kernels.cache.paged_kv import nan_fill, write_paged
from kvperf_kernels.formats.codecs import E4M3_MAX, E8M0_NAN, e4m3_encode_ref
from kvperf_kernels.quant import fp8, mxfp8, nvfp4
from kvperf_kernels.quant.groups import tensor_amax_ref

STORE_FORMATS = ("bf16", "fp8_per_tensor", "fp8_per_token", "fp8_per_block64", "mxfp8",
                 "nvfp4")
# formats the Triton decode kernel reads as stored (codes and scales): all of them
KERNEL_NATIVE = STORE_FORMATS
# formats whose values the torch reference path reads rounded to BF16: the unfused kernel
# path's BF16 copy before the fused decode (kept, so the CPU figures stay those recorded)
BF16_READBACK = ("mxfp8", "nvfp4")


class PagedStore:
    """One layer's K or V in ``fmt``: named page tensors plus per-tensor state. ``kernels``:
    quantise (and read back) through the Triton kernels (True; in the interpreter on CPU
    tensors too) or the torch references (False); None picks the kernels for CUDA tensors.
    ``readback``: also keep the stored values dequantised to this dtype, page by page, each
    slot decoded from its stored bytes once, when it is written (``readback`` tensor): what
    an attention that reads values sees, without decoding the whole history at every
    step."""

    def __init__(self, fmt: str, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, device, *, kernels: bool | None = None,
                 readback: torch.dtype | None = None):
        if fmt not in STORE_FORMATS:
            raise ValueError(f"unknown KV store format {fmt!r}; known: {STORE_FORMATS}")
        self.fmt = fmt
        self.kernels = kernels  # writes through the Triton quantisers; None: on a GPU
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.shape = shape
        lead = shape[:3]
        e4m3 = torch.float8_e4m3fn
        t: dict[str, torch.Tensor] = {}
        if fmt == "bf16":
            t["values"] = nan_fill(shape, torch.bfloat16, device)
        elif fmt.startswith("fp8_"):
            t["q"] = nan_fill(shape, e4m3, device)
            if fmt != "fp8_per_tensor":
                t["scale"] = torch.full(lead, float("nan"), device=device)
        elif fmt == "mxfp8":
            t["q"] = nan_fill(shape, e4m3, device)
            t["scale_e8m0"] = torch.full((*lead, head_dim // mxfp8.MX_BLOCK), E8M0_NAN,
                                         dtype=torch.uint8, device=device)
        else:  # nvfp4: E2M1 has no NaN, its block scales carry the poison
            t["packed"] = torch.zeros((*lead, head_dim // 2), dtype=torch.uint8, device=device)
            t["block_scale"] = nan_fill((*lead, head_dim // nvfp4.NVFP4_BLOCK), e4m3, device)
        self.tensors = t
        # the stored values read back (dequantised) slot by slot as they are written, for
        # attention paths that read values rather than codes; NaN where nothing is written
        self.readback = (None if readback is None
                         else torch.full(shape, float("nan"), dtype=readback, device=device))
        self.scale: torch.Tensor | None = None  # fp8_per_tensor: float32 (1,), static
        self.global_amax: torch.Tensor | None = None  # nvfp4: float32 (1,), static
        self.global_scale: torch.Tensor | None = None
        self.saturated = 0  # elements beyond a static scale's range after the first write
        self.tokens_written = 0

    # --- writing ---------------------------------------------------------------------------
    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store token vectors x [n, Hkv, D] (float) at flat ``slots`` [n] (page*size+slot)."""
        if x.shape[0] == 0:
            return
        x = x.contiguous()  # the quantisers take rows they can flatten without a copy
        fmt = self.fmt
        gpu = x.is_cuda if self.kernels is None else self.kernels
        if fmt == "bf16":
            parts = {"values": x.to(torch.bfloat16)}
        elif fmt == "fp8_per_tensor":
            if self.scale is None:
                q, s = (fp8.quantize_per_tensor if gpu else fp8.quantize_per_tensor_ref)(x)
                self.scale = s.float().reshape(1)
            else:  # the static scale, saturating (fp8's encode rule)
                xs = x.float() / self.scale
                self.saturated += int((xs.abs() > E4M3_MAX).sum())
                q = e4m3_encode_ref(xs)
            parts = {"q": q}
        elif fmt == "fp8_per_token":
            q, s = (fp8.quantize_per_token if gpu else fp8.quantize_per_token_ref)(x)
            parts = {"q": q, "scale": s.reshape(x.shape[:-1])}
        elif fmt == "fp8_per_block64":
            d = x.shape[-1]
            if gpu:
                q, s = fp8.quantize_per_block(x, block=d)
            else:
                q, s = fp8.quantize_per_block_ref(x, block=d)
            parts = {"q": q, "scale": s.reshape(x.shape[:-1])}
        elif fmt == "mxfp8":
            q, e = (mxfp8.quantize_mxfp8 if gpu else mxfp8.quantize_mxfp8_ref)(x)
            parts = {"q": q, "scale_e8m0": e}
        else:
            if self.global_amax is None:
                self.global_amax = tensor_amax_ref(x.float()).reshape(1).float()
            else:
                self.saturated += int((x.float().abs() > self.global_amax).sum())
            quant = nvfp4.quantize_nvfp4 if gpu else nvfp4.quantize_nvfp4_ref
            packed, block_scale, g = quant(x, global_amax=self.global_amax)
            self.global_scale = g.reshape(1)
            parts = {"packed": packed, "block_scale": block_scale}
        for name, values in parts.items():
            write_paged(self.tensors[name], slots, values.contiguous())
        if self.readback is not None:  # read the new slots back out of the pages
            values = self.dequantize(slots, dtype=self.readback.dtype, kernels=gpu)
            write_paged(self.readback, slots, values)
        self.tokens_written += x.shape[0]

    # --- reading ---------------------------------------------------------------------------
    def kernel_scale(self):
        """The decode kernel's k_scale/v_scale for a native format (None for BF16)."""
        if self.fmt == "bf16":
            return None
        if self.fmt == "fp8_per_tensor":
            return self.scale
        if self.fmt in ("mxfp8", "nvfp4"):
            raise ValueError(f"{self.fmt}: block scales, see kernel_args")
        return self.tensors["scale"]

    def kernel_values(self) -> torch.Tensor:
        return self.tensors[{"bf16": "values", "nvfp4": "packed"}.get(self.fmt, "q")]

    def kernel_args(self, side: str) -> dict:
        """The decode kernel's ``{side}_cache``, ``{side}_scale`` and ``{side}_block_scale``
        (side "k" or "v") for this store, read as stored."""
        if self.fmt == "mxfp8":
            scale, block = None, self.tensors["scale_e8m0"]
        elif self.fmt == "nvfp4":
            scale = self.global_scale if self.global_scale is not None else 1.0
            block = self.tensors["block_scale"]
        else:
            scale, block = self.kernel_scale(), None
        return {f"{side}_cache": self.kernel_values(), f"{side}_scale": scale,
                f"{side}_block_scale": block}

    def dequantize(self, index: torch.Tensor | None = None, *, dtype=torch.float32,
                   kernels: bool = False) -> torch.Tensor:
        """The stored values at flat slots ``index`` (any shape; None: every page), as
        ``dtype``: [*index.shape, Hkv, D] (or the page shape). ``kernels``: the quantisers'
        Triton dequantise kernels (GPU) instead of their torch references."""
        def pick(t):
            flat = t.view(-1, *t.shape[2:])
            if index is None:
                return t
            if t.element_size() == 1 and t.dtype.is_floating_point:
                return flat.view(torch.uint8)[index].view(t.dtype)
            return flat[index]

        p = {k: pick(v) for k, v in self.tensors.items()}
        fmt = self.fmt
        if fmt == "bf16":
            return p["values"].to(dtype)
        if fmt == "fp8_per_tensor":
            return ((fp8.dequantize if kernels else fp8.dequantize_ref)(
                p["q"].contiguous(), self.scale, dtype=dtype))
        if fmt in ("fp8_per_token", "fp8_per_block64"):
            s = p["scale"].unsqueeze(-1).contiguous()
            return (fp8.dequantize if kernels else fp8.dequantize_ref)(
                p["q"].contiguous(), s, dtype=dtype)
        if fmt == "mxfp8":
            return (mxfp8.dequantize_mxfp8 if kernels else mxfp8.dequantize_mxfp8_ref)(
                p["q"].contiguous(), p["scale_e8m0"].contiguous(), dtype=dtype)
        gs = self.global_scale if self.global_scale is not None else torch.ones(
            1, device=p["packed"].device)
        return (nvfp4.dequantize_nvfp4 if kernels else nvfp4.dequantize_nvfp4_ref)(
            p["packed"].contiguous(), p["block_scale"].contiguous(), gs, dtype=dtype)

    def nbytes(self) -> int:
        """Bytes of every page tensor plus the per-tensor scales."""
        extra = [t for t in (self.scale, self.global_scale) if t is not None]
        return stored_bytes(self.tensors) + stored_bytes(extra)

    def bytes_per_token(self) -> float:
        """Bytes one (token, all heads) costs in this format, per-tensor scales excluded."""
        slots = self.shape[0] * self.shape[1]
        return stored_bytes(self.tensors) / slots

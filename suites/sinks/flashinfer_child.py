"""Child process for test_flashinfer_sinks.py: runs one FlashInfer sink entry point for a
sequence of KV dtypes (BF16 then FP8 or the reverse) in ONE process and prints what it
found as a JSON line starting with ``KVPERF_RESULT``.

Why a child process: several FlashInfer JIT modules are named without the KV dtype
(``batch_prefill_attention_sink_{q}_swa_{bool}_{backend}``), so switching the KV dtype
rebuilds a shared library at the same path the process may already have mapped. A stale
or crashing process must fail one test with a clear message, not take the session down,
and each order must start from a clean process. The children share FlashInfer's on-disk
JIT cache, so a child's first step also checks reuse of another process's build.

Usage: python flashinfer_child.py '<json spec>'  (see test_flashinfer_sinks.py)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback
from pathlib import Path

import torch

from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.cache.paged_kv import to_flashinfer_indices
from kvperf_kernels.device import default_device
from kvperf_kernels.testing.inputs import make_decode_case

KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
KV_NAME = {"bf16": "bf16", "fp8": "e4m3"}  # FlashInfer's filename_safe_dtype_map
KV_CTYPE = {"bf16": "nv_bfloat16", "fp8": "__nv_fp8_e4m3"}  # its dtype_map_kv
RESULT_TAG = "KVPERF_RESULT "


def mapped_flashinfer_libraries() -> dict[str, dict]:
    """Shared libraries under a flashinfer path mapped into this process: path -> inode,
    whether the file was deleted since, and whether the path now holds another file."""
    libs: dict[str, dict] = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            deleted = path.endswith(" (deleted)")
            path = path.removesuffix(" (deleted)")
            if not path.endswith(".so") or "flashinfer" not in path:
                continue
            try:
                on_disk = os.stat(path).st_ino
            except OSError:
                on_disk = None
            libs[path] = {"inode": int(parts[4]), "deleted": deleted,
                          "replaced_on_disk": on_disk is not None and on_disk != int(parts[4])}
    return libs


def generated_config(uri: str) -> dict:
    """DTypeKV and AttentionVariant from the generated *config.inc of a JIT module."""
    from flashinfer.jit import env as jit_env

    found: dict = {"dir": str(jit_env.FLASHINFER_GEN_SRC_DIR / uri)}
    for inc in sorted((jit_env.FLASHINFER_GEN_SRC_DIR / uri).glob("*config.inc")):
        text = inc.read_text()
        kv = re.search(r"using DTypeKV = ([^;]+);", text)
        variant = re.search(r"using AttentionVariant = (\w+);", text)
        found[inc.name] = {"DTypeKV": kv.group(1) if kv else None,
                           "AttentionVariant": variant.group(1) if variant else None}
    return found


def module_prefix(spec: dict, kv: str) -> str:
    """Start of the JIT module name that must be mapped when this entry point ran this KV."""
    entry, backend, swa = spec["entry"], spec["backend"], spec["window_left"] >= 0
    if entry == "decode":
        family = "prefill" if spec["tensor_cores"] else "decode"
        return f"batch_{family}_with_kv_cache_dtype_q_bf16_dtype_kv_{KV_NAME[kv]}_"
    if entry == "sink_wrapper":
        return f"batch_prefill_attention_sink_bf16_swa_{swa}_{backend}"
    if entry == "xqa":
        return f"xqa_input_bf16_kv_cache_{KV_NAME[kv]}_output_bf16_page_size_{spec['page_size']}_"
    raise ValueError(f"unknown entry point {entry!r}")


def make_runner(spec: dict, kv, q, sm_scale: float, workspace: torch.Tensor):
    """(run(sinks) -> out, wrapper facts) for one entry point on one packed cache."""
    import flashinfer

    entry, backend, window_left = spec["entry"], spec["backend"], spec["window_left"]
    fp8 = kv.k_cache.dtype == torch.float8_e4m3fn
    k_scale = float(kv.k_scale) if fp8 else 1.0
    v_scale = float(kv.v_scale) if fp8 else 1.0
    hq, hkv, dim = q.shape[1], kv.num_kv_heads, kv.head_dim
    indptr, indices, last = to_flashinfer_indices(kv.block_tables, kv.seq_lens, kv.page_size)
    caches = (kv.k_cache, kv.v_cache)
    if entry == "decode":
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=spec["tensor_cores"], backend=backend)
        w.plan(indptr, indices, last, hq, hkv, dim, kv.page_size, window_left=window_left,
               q_data_type=q.dtype, kv_data_type=kv.k_cache.dtype, sm_scale=sm_scale)

        def run(sinks):
            return w.run(q, caches, k_scale=k_scale, v_scale=v_scale, sinks=sinks)

        facts = {"resolved_backend": getattr(w, "resolved_backend", None),
                 "use_tensor_cores": getattr(w, "use_tensor_cores", None)}
        return run, facts
    if entry == "sink_wrapper":
        w = flashinfer.BatchAttentionWithAttentionSinkWrapper(
            workspace, "NHD", backend=backend, q_data_type=q.dtype,
            kv_data_type=kv.k_cache.dtype, head_dim_qk=dim, head_dim_vo=dim,
            window_left=window_left)
        qo_indptr = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
        w.plan(qo_indptr, indptr, indices, last, hq, hkv, dim, kv.page_size, causal=False,
               window_left=window_left, q_data_type=q.dtype, kv_data_type=kv.k_cache.dtype,
               non_blocking=True)

        def run(sinks):
            # sm_scale goes positionally (the variant's own scalar), so k_scale is folded in
            # here; v_scale is applied by run() after the kernel.
            return w.run(q, caches, sinks, sm_scale * k_scale, v_scale=v_scale)

        facts = {"backend": getattr(w, "_backend", None),
                 "cached_kv_data_type": str(getattr(w, "_cached_kv_data_type", None)),
                 "jit_additional_tensor_names": getattr(w, "_jit_additional_tensor_names", None)}
        return run, facts
    if entry == "xqa":
        from flashinfer.decode import xqa_batch_decode_with_kv_cache

        max_len = int(kv.seq_lens.max())

        def run(sinks):
            return xqa_batch_decode_with_kv_cache(
                q, caches, workspace, kv.block_tables, kv.seq_lens, max_len,
                bmm1_scale=k_scale * sm_scale, bmm2_scale=v_scale, window_left=window_left,
                sinks=sinks, kv_layout="NHD")

        return run, {}
    raise ValueError(f"unknown entry point {entry!r}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> dict:
    out64, ref64 = out.double(), ref.double()
    finite = bool(torch.isfinite(out64).all())
    diff = (out64 - ref64).abs()
    bound = atol + rtol * ref64.abs()
    bad = diff > bound
    worst = int((diff - bound).flatten().argmax())
    idx = [int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape)]
    return {
        "finite": finite,
        "within_tol": finite and not bool(bad.any()),
        "n_bad": int(bad.sum()), "numel": out.numel(),
        "max_abs_err": float(diff.max()) if finite else math.inf,
        "rel_l2_err": float((out64 - ref64).norm() / ref64.norm()) if finite else math.inf,
        "worst": {"index_b_h_d": idx, "out": float(out64.flatten()[worst]),
                  "ref": float(ref64.flatten()[worst])},
    }


def run_step(spec: dict, kv_key: str, workspace: torch.Tensor) -> dict:
    kv_dtype = KV_DTYPES[kv_key]
    case = make_decode_case(spec["lens"], hq=spec["hq"], hkv=spec["hkv"],
                            head_dim=spec["head_dim"], page_size=spec["page_size"],
                            seed=spec["seed"], device=default_device())
    # Sinks near log(len): from a few % of the softmax mass (long sequences) to nearly all
    # of it (short ones), so an ignored sink is far outside any tolerance while the long
    # sequences still test the token part.
    sinks = (case.sinks + math.log(max(spec["lens"])) - 3.0).float().contiguous()
    kv = case.pack(kv_dtype, "per_tensor" if kv_key == "fp8" else None)
    sm_scale = 1.0 / math.sqrt(spec["head_dim"])
    window_left = spec["window_left"]
    ref_args = (case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    ref_kwargs = dict(k_scale=kv.k_scale, v_scale=kv.v_scale, sm_scale=sm_scale,
                      window_left=window_left)
    ref = paged_decode_attention_ref(*ref_args, sinks=sinks, **ref_kwargs)
    ref_no_sink = paged_decode_attention_ref(*ref_args, sinks=None, **ref_kwargs)
    atol, rtol = spec["tolerance"][kv_key]
    step: dict = {"kv": kv_key}
    run, step["wrapper"] = make_runner(spec, kv, case.q, sm_scale, workspace)
    out = run(sinks)
    _sync()
    step["vs_reference"] = compare(out, ref, atol, rtol)
    # which sequences went wrong says more than one worst element (e.g. only short ones)
    rows_nonfinite = (~torch.isfinite(out)).flatten(1).any(1).tolist()
    step["vs_reference"]["nonfinite_seq_lens"] = [
        n for n, bad in zip(spec["lens"], rows_nonfinite, strict=True) if bad]
    if not step["vs_reference"]["finite"]:
        # Our caches hold NaN in every slot no sequence owns. Same cache with zeros there:
        # right then means the kernel reads past a sequence's end and lets what it finds in.
        clean = case.pack(kv_dtype, "per_tensor" if kv_key == "fp8" else None, poison=False)
        run_clean, _ = make_runner(spec, clean, case.q, sm_scale, workspace)
        step["vs_reference_zero_padding"] = compare(run_clean(sinks), ref, atol, rtol)
    step["vs_no_sink_reference"] = compare(out, ref_no_sink, atol, rtol)
    swamped = run(torch.full_like(sinks, 30.0))
    step["sink_plus30_max_abs"] = float(swamped.double().abs().max())
    silent = run(torch.full_like(sinks, -1e4))
    step["sink_minus1e4_vs_no_sink"] = compare(silent, ref_no_sink, atol, rtol)
    _sync()
    libs = mapped_flashinfer_libraries()
    prefix = module_prefix(spec, kv_key)
    mine = {p: info for p, info in libs.items() if Path(p).name.startswith(prefix)}
    step["path"] = {
        "expected_prefix": prefix,
        "mapped": mine,
        "configs": {Path(p).stem: generated_config(Path(p).stem) for p in mine},
        "expected_dtype_kv": KV_CTYPE[kv_key],
    }
    return step


def main() -> int:
    spec = json.loads(sys.argv[1])
    import flashinfer

    result: dict = {"flashinfer": getattr(flashinfer, "__version__", "?"),
                    "device": str(default_device()), "steps": []}
    # XQA's first 8 MiB are semaphores that must start zeroed; zeros suit every entry.
    workspace = torch.zeros(256 * 1024 * 1024, dtype=torch.uint8, device=default_device())
    for kv_key in spec["order"]:
        try:
            result["steps"].append(run_step(spec, kv_key, workspace))
        except Exception as exc:  # reported per step; the parent turns it into a failure
            result["steps"].append({"kv": kv_key, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc(limit=8)})
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

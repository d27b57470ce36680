"""Compile a Triton kernel for an NVIDIA target without a GPU (Triton's bundled ptxas), so a
CPU machine can check that a kernel compiles for sm90 and what its PTX holds (TMA copies,
atomics) before a GPU run is spent on it.

``compile_offline`` compiles in this process; Triton's interpreter (TRITON_INTERPRET=1)
patches triton.language, so ``in_child`` runs a module-level function of this package in a
child process without it and returns its JSON result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import triton

from kvperf_kernels.device import interpreted


def compile_offline(fn, types: dict[str, str], constexprs: dict, *, capability: int = 90,
                    num_warps: int = 4, num_stages: int = 3,
                    aligned: tuple[str, ...] = (), maxnreg: int | None = None) -> dict:
    """Assembly ({'ptx': ..., 'ttgir': ..., 'cubin': ...}) of ``fn`` compiled for
    cuda:``capability``. types: Triton signature types of the runtime arguments ("*bf16",
    "i32", "fp32"; others "i32"); pointers are declared 16-byte aligned, as a launch with
    torch tensors specialises them, and so are the integer arguments named in ``aligned``
    (a launch declares an int divisible by 16 when its value is a multiple of 16); maxnreg:
    Triton's register cap per thread (None: ptxas's choice)."""
    if interpreted():
        raise RuntimeError("compile_offline cannot run under TRITON_INTERPRET=1 (the "
                           "interpreter patches triton.language); use in_child")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
            if sig[name].startswith("*") or name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages,
                                     **({"maxnreg": maxnreg} if maxnreg else {})})
    return dict(kernel.asm)


_ASYNC_WAIT = re.compile(r"ttg\.async_wait\b[^{]*\{num = (\d+)")


def prefetch_depth(ttgir: str) -> int:
    """How many groups of async copies (cp.async) the kernel's deepest wait leaves in flight,
    from its TTGIR; 0 when every wait drains them all, i.e. a pipelined loop that waits for
    the copies it has just issued: with a tile's indices loaded in the tile's own address
    chain, Triton's pipeliner spends a stage on the indices and does exactly that."""
    return max((int(n) for n in _ASYNC_WAIT.findall(ttgir)), default=0)


def in_child(module: str, function: str, *args, timeout: float = 300):
    """``module.function(*args)`` (JSON-able arguments and result) in a child process without
    TRITON_INTERPRET; its stderr tail in the error when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json, sys; from {module} import {function} as f; "
            f"json.dump(f(*json.loads(sys.argv[1])), sys.stdout)")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{module}.{function} failed in the child: "
                           f"{done.stderr.strip()[-600:]}")
    return json.loads(done.stdout)

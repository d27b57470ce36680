"""Reading KV pages from a file (the memmap tier) warm from the page cache and cold.

``drop_file_cache`` drops the file's pages from the page cache: ``posix_fadvise(DONTNEED)``
on the file (any user, that file's clean pages only), else ``/proc/sys/vm/drop_caches``
where it is writable (root on a host); ``resident_fraction`` (``mincore`` on a mapping of
the file) tells whether the pages really left: a "cold" figure is reported only if they did.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time

DROP_CACHES = "/proc/sys/vm/drop_caches"


def resident_fraction(path) -> float:
    """Share of the file's pages in the page cache now (mincore over a read-only map)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as f:  # a mapping outlives its descriptor
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {path} for mincore: {os.strerror(err)}")
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(addr, size, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        return sum(b & 1 for b in vec.raw[:pages]) / pages
    finally:
        libc.munmap(addr, size)


def drop_file_cache(path) -> str:
    """Drop the file's pages from the page cache; returns how (or why it could not).

    posix_fadvise(DONTNEED) first: it drops this file only (others' caches on a shared
    machine stay); /proc/sys/vm/drop_caches (every clean page) only if pages remain."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        fadvise = "posix_fadvise DONTNEED"
    except (OSError, AttributeError) as exc:
        fadvise = f"posix_fadvise failed ({exc})"
    finally:
        os.close(fd)
    if resident_fraction(path) < 0.01:
        return fadvise
    try:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")
    except OSError as exc:
        return f"not dropped: {fadvise} left pages and {DROP_CACHES} is not writable " \
               f"({exc.strerror})"
    return f"drop_caches (after {fadvise} left pages)"


def timed_read(path, chunk: int = 8 << 20) -> tuple[bytes, float]:
    """(the file's bytes, GB/s of reading it through read(2) in ``chunk`` pieces)."""
    out = bytearray(os.path.getsize(path))
    view = memoryview(out)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(out):
            n = f.readinto(view[pos:pos + chunk])
            if not n:
                raise OSError(f"{path}: short read at {pos} of {len(out)} bytes")
            pos += n
    dt = time.perf_counter() - t0
    return bytes(out), len(out) / dt / 1e9

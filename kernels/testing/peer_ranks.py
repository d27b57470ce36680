"""The ranks of a two-device page move as processes (torch.distributed), for the suites.

* ``run_ranks(target, devices, backend)``: one spawned process per device; each joins a
  process group (TCP store on a free local port, ``timeout_s`` on every operation), runs
  ``target(rank, device, *args)`` and hands back its result. A rank's exception comes
  back as ``RankFailed`` with its traceback; a rank still running at the deadline is
  ended (its own process, by pid) and named.
* ``ServedReceiver``: this process is rank 0 (the sender, so ``kv_bench`` can time its
  sends), a spawned rank 1 receives. ``step()`` before each send lets the receiver post one
  receive: a timing loop of any length pairs with it, and the count crosses through
  shared memory, never through the timed channel. ``finish()`` returns the receiver's bit
  for bit check of its pool against the torch reference.
* ``exchange_pages``: a ``run_ranks`` target that runs ``RankCase`` moves (rank 0 sends,
  rank 1 receives and checks), errors included: a case whose ranks disagree must raise
  the same words on both.

Targets run in fresh interpreters (spawn: CUDA cannot be forked), so they live here, in an
importable module, never in a test file.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvperf_kernels.offload import peer_transfer as pt
from kvperf_kernels.offload.page_copy import check_pages_moved
from kvperf_kernels.testing.page_moves import MoveSpec

POLL_S = 20e-6  # the served receiver's pause while it waits for the next step


class RankFailed(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the store binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(backend: str, init_method: str, rank: int, world: int, device,
               timeout_s: float) -> torch.device:
    """init_process_group for this rank, bound to ``device``; returns the device."""
    device = torch.device(device)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process "
                           "(a move's group left behind?)")
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device  # eager NCCL init, bound to this rank's GPU
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ run_ranks


def _rank_entry(rank, world, init_method, backend, devices, timeout_s, target, args, results):
    try:
        device = join_group(backend, init_method, rank, world, devices[rank], timeout_s)
        try:
            out = target(rank, device, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, None, out))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", None))


def _end(procs) -> None:
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def run_ranks(target, devices, backend: str, args=(), *, timeout_s: float = 60.0) -> list:
    """target(rank, device, *args) on one spawned rank per entry of ``devices``; the list
    of their results, rank by rank."""
    world = len(devices)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_entry, daemon=True,
                         args=(r, world, init, backend, tuple(devices), timeout_s, target,
                               args, results)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s + 30  # the group's own timeout fires first
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, err, out = results.get(timeout=0.2)
                got[rank] = (err, out)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None
                        and r not in got]
                if dead and results.empty():
                    time.sleep(0.5)  # a result posted just before the exit
                    if results.empty():
                        break
    finally:
        _end(procs)
    errors = [f"rank {r}: {got[r][0]}" for r in sorted(got) if got[r][0]]
    if errors:
        raise RankFailed("\n".join(errors))
    missing = [r for r in range(world) if r not in got]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise RankFailed(f"ranks {missing} gave no result within {timeout_s:.0f} s "
                         f"(exit codes {codes})")
    return [got[r][1] for r in range(world)]


# ------------------------------------------------------------------ the two sides of a move


def sender_side(spec: MoveSpec, staged: bool, device):
    """(src, ids, staging) of a send: ids beside src when staged, on the host otherwise."""
    src = spec.source(device)
    ids = spec.ids().to(device if staged else "cpu")
    staging = (torch.empty((max(spec.n, 1), *spec.page_shape), dtype=spec.dtype,
                           device=device) if staged else None)
    return src, ids, staging


def receiver_side(spec: MoveSpec, staged: bool, device, *, wrong_slots: bool = False):
    """(dst, slots, staging, before) of a receive; wrong_slots: the control's mapping."""
    dst = spec.pool(device)
    slots = (spec.wrong_slots() if wrong_slots else spec.slots()).to(
        device if staged else "cpu")
    staging = (torch.empty((max(spec.n, 1), *spec.page_shape), dtype=spec.dtype,
                           device=device) if staged else None)
    return dst, slots, staging, dst.clone()


def check_received(spec: MoveSpec, dst: torch.Tensor, before: torch.Tensor) -> str | None:
    """None when dst holds exactly the reference's bytes, else what differs."""
    try:
        check_pages_moved(spec.source(dst.device), spec.ids(), dst, spec.slots(), before)
    except AssertionError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class RankCase:
    """One move of exchange_pages: what the sender sends (spec, staged) and what the
    receiver expects (receiver_spec / receiver_staged, None: the same)."""

    name: str
    spec: MoveSpec
    staged: bool = True
    receiver_spec: MoveSpec | None = None
    receiver_staged: bool | None = None
    wrong_slots: bool = False  # the receiver scatters each page into its neighbour's slot


def exchange_pages(rank: int, device, cases) -> list[dict]:
    """run_ranks target: rank 0 sends each case, rank 1 receives and checks it. Per case:
    {"error": the rank's exception words or None, "check": the receiver's mismatch or
    None}; a case's error leaves the channel clean for the next (both ranks raise at the
    header, before any page is sent)."""
    out = []
    for case in cases:
        spec = case.spec if rank == 0 else (case.receiver_spec or case.spec)
        staged = case.staged if rank == 0 or case.receiver_staged is None else (
            case.receiver_staged)
        res = {"case": case.name, "error": None, "check": None}
        try:
            if rank == 0:
                src, ids, staging = sender_side(spec, staged, device)
                pt.send_pages(src, ids, 1, staging=staging)
            else:
                dst, slots, staging, before = receiver_side(spec, staged, device,
                                                            wrong_slots=case.wrong_slots)
                pt.recv_pages(dst, slots, 0, staging=staging)
                _sync(device)
                res["check"] = check_received(spec, dst, before)
        except (ValueError, TypeError) as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
        out.append(res)
    _sync(device)
    dist.barrier()  # no rank leaves (destroying its group) while the other still receives
    return out


# ------------------------------------------------------------------ the served receiver


def _serve(conn, init_method, backend, device, timeout_s, steps, stop):
    try:
        device = join_group(backend, init_method, 1, 2, device, timeout_s)
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"rank 1 could not join: {type(exc).__name__}: {exc}"))
        return
    conn.send(("joined", None))
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "exit":
                break
            _, spec, staged, wrong = cmd
            dst, slots, staging, before = receiver_side(spec, staged, device, wrong_slots=wrong)
            _sync(device)
            conn.send(("ready", None))
            conn.send(("done", _receive_steps(spec, dst, slots, staging, before, steps, stop,
                                              device)))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"rank 1: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def _receive_steps(spec, dst, slots, staging, before, steps, stop, device) -> dict:
    posted = 0
    try:
        while True:
            if posted < steps.value:
                pt.recv_pages(dst, slots, 0, staging=staging, checked=posted == 0)
                posted += 1
            elif 0 <= stop.value <= posted:
                break
            else:
                time.sleep(POLL_S)
        _sync(device)
    except (ValueError, TypeError) as exc:
        return {"steps": posted, "error": f"{type(exc).__name__}: {exc}", "check": None}
    return {"steps": posted, "error": None, "check": check_received(spec, dst, before)}


class ServedReceiver:
    """``with ServedReceiver("nccl", ("cuda:0", "cuda:1")) as peer:`` this process joins as
    rank 0 on devices[0], a spawned rank 1 serves receives on devices[1]. Per move:
    ``receive(spec)``, then ``step()`` before each ``send_pages`` (the first one checked),
    then ``finish()``."""

    def __init__(self, backend: str, devices=("cpu", "cpu"), *, timeout_s: float = 120.0):
        self.backend, self.devices, self.timeout_s = backend, tuple(devices), timeout_s
        self._proc = None

    def __enter__(self) -> ServedReceiver:
        ctx = mp.get_context("spawn")
        self._steps, self._stop = ctx.RawValue("q", 0), ctx.RawValue("q", -1)
        self._conn, child = ctx.Pipe()
        init = f"tcp://127.0.0.1:{free_port()}"
        self._proc = ctx.Process(target=_serve, daemon=True,
                                 args=(child, init, self.backend, self.devices[1],
                                       self.timeout_s, self._steps, self._stop))
        self._proc.start()
        try:
            self.device = join_group(self.backend, init, 0, 2, self.devices[0],
                                     self.timeout_s)
            self._expect("joined")
        except BaseException:
            self._close()
            raise
        return self

    def _expect(self, kind: str):
        deadline = time.monotonic() + self.timeout_s
        while not self._conn.poll(0.2):
            if self._proc.exitcode is not None:
                raise RankFailed(f"rank 1 exited with code {self._proc.exitcode} while this "
                                 f"rank waited for {kind!r}")
            if time.monotonic() > deadline:
                raise RankFailed(f"rank 1 did not answer {kind!r} within {self.timeout_s} s")
        got, value = self._conn.recv()
        if got == "error":
            raise RankFailed(value)
        if got != kind:
            raise RankFailed(f"rank 1 answered {got!r}, expected {kind!r}")
        return value

    def receive(self, spec: MoveSpec, *, staged: bool = True, wrong_slots: bool = False):
        """Rank 1 builds its pool and slots for ``spec`` and waits for steps."""
        self._steps.value, self._stop.value = 0, -1
        self._conn.send(("receive", spec, staged, wrong_slots))
        self._expect("ready")

    def step(self) -> None:
        self._steps.value += 1

    def send(self, src, ids, *, staging=None, checked: bool = False) -> None:
        """One step and its send_pages to rank 1 (what a timing loop calls)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # a captured send would run only on replay, but rank 1 would post its receive
            raise RuntimeError("a served send cannot be captured in a CUDA graph")
        self.step()
        pt.send_pages(src, ids, 1, staging=staging, checked=checked)

    def finish(self) -> dict:
        """After the last send: {"steps", "error", "check"} from rank 1."""
        self._stop.value = self._steps.value
        return self._expect("done")

    def _close(self) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.is_alive():
                self._stop.value = self._steps.value
                self._conn.send(("exit",))
        except (BrokenPipeError, OSError):
            pass
        _end([self._proc])
        if dist.is_initialized():
            dist.destroy_process_group()
        self._proc = None

    def __exit__(self, *exc) -> bool:
        self._close()
        return False

"""CUDA-graph modes of the decode step (vLLM's names): EAGER, FULL, PIECEWISE,
FULL_AND_PIECEWISE.

- FULL: the whole step (24 layers, attention included) captured as one graph per batch-size
  bucket; a batch runs in the smallest bucket that holds it, the rows beyond it padded.
- PIECEWISE: graphs around the non-attention pieces (embed + layer 0's QKV, then per layer
  "o-proj + MLP + the next layer's QKV", then the head), attention run eagerly between
  replays on the bucket's static buffers: what an engine does when its attention backend
  cannot be captured for every batch.
- FULL_AND_PIECEWISE: FULL for batches up to the largest full bucket (uniform decode
  batches), PIECEWISE for larger ones, as vLLM's default.

Padding: a padded row decodes token 0 at position 0 of the model's scratch page (its K/V
written to and read from that page only), so it cannot touch a real sequence's cache or
output. A batch above every bucket of its mode is an error naming ``batch``.

``capture=False`` runs the same pieces on the same static buffers without graphs: on the CPU
that tests the bucketing, padding and the piece split (the composition must equal the eager
step) without a GPU; ``capture=True`` needs CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvperf_kernels.formats.checks import check_int
from kvperf_kernels.models.decode_step import DecodeStepModel, StepBuffers, fill_inputs

MODES = ("EAGER", "FULL", "PIECEWISE", "FULL_AND_PIECEWISE")
DEFAULT_FULL_BUCKETS = (1, 2, 4, 8, 16, 32)
DEFAULT_PIECEWISE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= batch; a larger batch is an error naming it."""
    check_int(batch, "batch", 1)
    fits = [b for b in sorted(buckets) if b >= batch]
    if not fits:
        raise ValueError(f"batch {batch} is larger than the largest captured bucket "
                         f"{max(buckets)}")
    return fits[0]


def pad_rows(b: StepBuffers, real: int, scratch_page: int, page_size: int) -> None:
    """Rows real.. of a bucket's buffers: token 0 at position 0 of the scratch page."""
    if real >= b.batch:
        return
    b.tokens[real:] = 0
    b.positions[real:] = 0
    b.block_tables[real:] = scratch_page
    b.seq_lens[real:] = 1
    b.slots[real:] = scratch_page * page_size


class _Graphed:
    """One callable run as a CUDA graph (captured on first use) or directly."""

    def __init__(self, fn: Callable[[], None], capture: bool, pool):
        self.fn, self.graph = fn, None
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                fn()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class StepRunner:
    """Runs decode steps of ``model`` in one of ``MODES``; ``run`` returns (logits, tokens) of
    the real rows (views of the bucket's buffers: copy them before the next step)."""

    def __init__(self, model: DecodeStepModel, mode: str, *, max_pages: int,
                 full_buckets: Sequence[int] = DEFAULT_FULL_BUCKETS,
                 piecewise_buckets: Sequence[int] = DEFAULT_PIECEWISE_BUCKETS,
                 capture: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_int(max_pages, "max_pages", 1)
        for name, bs in (("full_buckets", full_buckets), ("piecewise_buckets", piecewise_buckets)):
            if not bs or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in bs):
                raise ValueError(f"{name} must be positive ints, got {bs!r}")
        if capture is None:
            capture = model.device.type == "cuda"
        if capture and model.device.type != "cuda":
            raise ValueError("capture=True needs the model on a CUDA device")
        self.model, self.mode, self.max_pages, self.capture = model, mode, max_pages, capture
        self.full_buckets = tuple(sorted(full_buckets))
        self.piecewise_buckets = tuple(sorted(piecewise_buckets))
        self._buffers: dict[tuple[str, int], StepBuffers] = {}
        self._runs: dict[tuple[str, int], Callable[[], None]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    # --- dispatch -----------------------------------------------------------------------
    def kind_for(self, batch: int) -> str:
        """"EAGER", "FULL" or "PIECEWISE": what runs a batch of this size."""
        if self.mode == "FULL_AND_PIECEWISE":
            check_int(batch, "batch", 1)
            return "FULL" if batch <= self.full_buckets[-1] else "PIECEWISE"
        return self.mode

    def buckets(self, kind: str) -> tuple[int, ...]:
        return self.full_buckets if kind == "FULL" else self.piecewise_buckets

    def run(self, tokens, positions, block_tables) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokens.shape[0]
        kind = self.kind_for(batch)
        if block_tables.shape[1] > self.max_pages:
            raise ValueError(f"block_tables has {block_tables.shape[1]} pages per sequence, "
                             f"the runner's buffers {self.max_pages}")
        size = batch if kind == "EAGER" else bucket_for(batch, self.buckets(kind))
        key = (kind, size)
        b = self._buffers.get(key)
        if b is None:
            b = self._buffers[key] = self.model.new_buffers(size, self.max_pages)
        b.block_tables.fill_(self.model.scratch_page)
        fill_inputs(b, tokens, positions, block_tables, self.model.page_size)
        pad_rows(b, batch, self.model.scratch_page, self.model.page_size)
        if kind == "EAGER":
            self.model.step(b)
        else:
            if key not in self._runs:
                self._runs[key] = self._build(kind, b)
            self._runs[key]()
        return b.logits[:batch], b.next_tokens[:batch]

    # --- graphs -------------------------------------------------------------------------
    def _build(self, kind: str, b: StepBuffers) -> Callable[[], None]:
        m = self.model
        if self.capture:  # compile every Triton kernel and warm cuBLAS outside the capture
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                m.step(b)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
        if kind == "FULL":
            return _Graphed(lambda: m.step(b), self.capture, self.pool)
        layers = m.cfg.layers

        def first():
            m.embed_tokens(b)
            m.pre_attention(0, b)

        def middle(layer):
            def piece():
                m.post_attention(layer - 1, b)
                m.pre_attention(layer, b)
            return piece

        def last():
            m.post_attention(layers - 1, b)
            m.lm_head(b)

        pieces = [_Graphed(first, self.capture, self.pool)]
        pieces += [_Graphed(middle(layer), self.capture, self.pool)
                   for layer in range(1, layers)]
        pieces.append(_Graphed(last, self.capture, self.pool))

        def run():
            for layer in range(layers):
                pieces[layer]()
                m.attend(layer, b)  # eager, between the graphs
            pieces[layers]()
        return run

    @property
    def graph_count(self) -> int:
        """CUDA graphs captured so far (0 without capture): one per FULL bucket, layers + 1
        per PIECEWISE bucket."""
        if not self.capture:
            return 0
        return sum(1 if kind == "FULL" else self.model.cfg.layers + 1 for kind, _ in self._runs)

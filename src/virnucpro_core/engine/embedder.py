"""Embedding stage: a shard's packs through the packed ESM-2, pooled per record.

The GPU never waits on Python: packs are tokenised ahead (:mod:`.prefetch`) and copied
asynchronously; pooled outputs stay on the device until the plan's packs are done, and go to the host when
first read (:class:`EmbedResult`), on a side stream.
On CUDA out-of-memory a pack is split in two and retried, down to single sequences.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.loader import LoadedModel
from ..options import EmbeddingOptions, resolve_layers
from .equivalence import reference_hidden
from .packed_esm2 import POOLINGS, PackedESM2, pool, residues
from .packing import Pack, Plan
from .prefetch import prefetch
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(device: str, dtype: str) -> str:
    """The CPU computes in float32 whatever the configured GPU dtype."""
    if device == "cpu" and dtype != "float32":
        log.info("on the CPU: computing in float32 instead of %s", dtype)
        return "float32"
    return dtype


class SequenceTooLargeError(RuntimeError):
    pass


@dataclass(frozen=True)
class Outputs:
    """What to compute: pooled columns per (layer, pooling) and optional per-residue layers."""

    layers: tuple[int, ...]  # layers for pooled columns; the last layer is always included
    poolings: tuple[str, ...]
    per_residue_layers: tuple[int, ...]

    @staticmethod
    def resolve(num_layers: int, options: EmbeddingOptions) -> "Outputs":
        """Layers as indices 0..num_layers; the last layer's mean (the ``embedding`` column) is always included."""
        for p in options.poolings:
            if p not in POOLINGS:
                raise ValueError(f"pooling must be one of {POOLINGS}, not {p!r}")
        return Outputs(
            resolve_layers((*options.layers, -1), num_layers, "embedding.layers"),
            tuple(dict.fromkeys(["mean", *options.poolings])),
            resolve_layers(options.per_residue_layers, num_layers, "embedding.per_residue_layers"),
        )

    def columns(self, num_layers: int) -> list[tuple[str, int, str]]:
        """(column name, layer, pooling); the default ``embedding`` is the last layer's mean."""
        cols = [("embedding", num_layers, "mean")]
        for layer in self.layers:
            for p in self.poolings:
                if (layer, p) != (num_layers, "mean"):
                    cols.append((f"embedding_{p}_l{layer}", layer, p))
        return cols

    @property
    def all_layers(self) -> list[int]:
        return sorted(set(self.layers) | set(self.per_residue_layers))


@dataclass
class EmbedResult:
    """A shard's (or chunk's) embeddings. The pooled columns may still be on the device when it is returned:
    the first read of ``pooled`` copies them to the host on a side stream, so that a writer thread can take them
    while the GPU computes the next chunk."""

    device_pooled: dict[str, torch.Tensor]  # column -> (n_records, dim) float32, on the device
    per_residue: dict[str, list[np.ndarray]] = field(default_factory=dict)  # column -> per record (L, dim)
    stats: dict = field(default_factory=dict)
    ready: torch.cuda.Event | None = None  # recorded once the pooling kernels are queued (on a GPU)
    _host: dict[str, np.ndarray] | None = None

    @property
    def pooled(self) -> dict[str, np.ndarray]:
        """column -> (n_records, dim) float32 on the host."""
        if self._host is None:
            tensors, side = self.device_pooled, None
            if self.ready is not None and tensors:
                side = torch.cuda.Stream(next(iter(tensors.values())).device)
                side.wait_event(self.ready)
            with torch.cuda.stream(side):  # None: the current stream
                self._host = {c: t.cpu().numpy() for c, t in tensors.items()}
            self.device_pooled, self.ready = {}, None
        return self._host


def to_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` on ``device``, floating tensors cast to ``dtype`` there (torch casts on the host first
    otherwise). The tensors are copied by several threads: a checkpoint's memory-mapped pages are
    read (page faults, from the page cache on a node that has read it before) as they are copied."""
    from concurrent.futures import ThreadPoolExecutor

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    move = lambda t: t.to(device).to(dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    with ThreadPoolExecutor(8, thread_name_prefix="to-device") as pool:
        moved = dict(zip(tensors, pool.map(move, tensors.values())))
    return model._apply(lambda t: moved[id(t)] if id(t) in moved else move(t))


class Embedder:
    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device,
        dtype: str,
        backend: str,
        gelu: str = "auto",
    ) -> None:
        """The engine on ``device``, computing in ``dtype``, attention ``backend`` (or ``auto``), fc1's ``gelu``
        (``auto`` or ``exact``: :func:`.packed_esm2.gelu_form`)."""
        self.device = torch.device(device)
        self.dtype_name = dtype
        # The cast: fair-esm's model onto the device, its floating tensors in the compute dtype (in place:
        # ``loaded.model`` is this model afterwards), then the packed engine built from it there (q/k/v fused on
        # the device, layer norms kept fp32: PackedESM2's dtype rules). Casting a PackedESM2 built on the host
        # gives the same tensors, but fuses q/k/v on the host and checks the attention backend for the host.
        model = to_device(loaded.model, self.device, DTYPES[dtype]).eval()
        self.packed = PackedESM2(model, backend, gelu)
        self.tokenizer = Tokenizer(loaded.alphabet)
        self._ids: list[str] | None = None

    @property
    def backend(self) -> str:
        return self.packed.backend

    def _to_device(self, sequences: list[str], pack: Pack) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(self.tokenizer.pack_tokens(sequences, pack)).to(self.device)
        return tokens, torch.from_numpy(pack.cu_seqlens).to(self.device)

    def residue_states(self, sequences: list[str], pack: Pack, layer: int) -> list[torch.Tensor]:
        """Residue states (L, dim) of every item of one pack at ``layer``, through the packed forward."""
        tokens, cu = self._to_device(sequences, pack)
        return residues(self.packed(tokens, cu, int(pack.lengths.max()) + 2, [layer])[layer], cu)

    def unpacked_residue_states(self, sequences: list[str], pack: Pack, layer: int) -> list[torch.Tensor]:
        """The same items through fair-esm's own forward, one at a time, no padding, fp32 rotary."""
        singles = [self._to_device(sequences, pack.item(i))[0] for i in range(len(pack.lengths))]
        return [h[1:-1] for h in reference_hidden(self.packed.esm2, singles, layer)]

    def _forward(self, pack: Pack, tokens: torch.Tensor, cu: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        return self.packed(tokens, cu, int(pack.lengths.max()) + 2, layers)

    def _run(self, pack: Pack, first: int, tokens: torch.Tensor, cu: torch.Tensor, outputs: Outputs, sink) -> None:
        """Forward one pack (its items numbered from ``first`` on) and hand the outputs to
        ``sink``; split and retry on OOM."""
        try:
            hidden = self._forward(pack, tokens, cu, outputs.all_layers)
        except torch.cuda.OutOfMemoryError:
            hidden = None
        if hidden is not None:
            sink(first, cu, hidden)
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(pack.lengths) == 1:
            r = int(pack.records[0])
            name = f"{self._ids[r]} (row {r})" if self._ids else f"row {r}"
            raise SequenceTooLargeError(
                f"out of memory on a single sequence: record {name}, "
                f"{int(pack.lengths[0])} residues (window start {int(pack.starts[0])}); lower the model size or use a larger GPU"
            )
        log.warning("out of memory on a pack of %d sequences (%d tokens): splitting it in two", len(pack.lengths), pack.tokens)
        cu_host = pack.cu_seqlens
        h = len(pack.lengths) // 2
        for part, (a, b) in zip(pack.split(), ((0, h), (h, len(pack.lengths)))):
            t = tokens[int(cu_host[a]) : int(cu_host[b])]
            c = cu[a : b + 1] - cu[a]
            self._run(part, first + a, t, c, outputs, sink)

    def embed(
        self, sequences: list[str], plan: Plan, outputs: Outputs, progress_every: float = 30.0, ids: list[str] | None = None,
        on_pack=None,
    ) -> EmbedResult:
        """Embed every record of a shard (``sequences`` in shard order) following ``plan``;
        ``ids`` name records in errors; ``on_pack(tokens)`` is called after each pack is handed to the device
        with the tokens handed so far."""
        self._ids = ids
        n_layers = self.packed.num_layers
        columns = outputs.columns(n_layers)
        n_items = sum(len(p.lengths) for p in plan.packs)
        dim = self.packed.esm2.embed_dim
        dev = self.device
        item_rows = {c: torch.zeros(n_items, dim, dtype=torch.float32, device=dev) for c, _, _ in columns}
        item_record, item_start, item_len = (
            np.concatenate([getattr(p, attr) for p in plan.packs] + [np.zeros(0, np.int64)]) for attr in ("records", "starts", "lengths")
        )
        residue_parts: dict[str, dict[int, torch.Tensor]] = {f"per_residue_l{l}": {} for l in outputs.per_residue_layers}
        # items are numbered in plan order
        first_item = np.concatenate([[0], np.cumsum([len(p.lengths) for p in plan.packs])]).astype(np.int64)

        def sink(first: int, cu: torch.Tensor, hidden: dict[int, torch.Tensor]) -> None:
            n = len(cu) - 1
            for col, layer, how in columns:
                item_rows[col][first : first + n] = pool(hidden[layer], cu, how)
            for layer in outputs.per_residue_layers:
                for i, r in enumerate(residues(hidden[layer], cu), first):
                    residue_parts[f"per_residue_l{layer}"][i] = r.float().cpu()

        tokens_done, t0, last = 0, time.perf_counter(), time.perf_counter()
        total_tokens = sum(p.tokens for p in plan.packs)
        first_pack_s = None
        # the first pack's time includes loading the kernels (compiling them, the first time on a node); on a GPU
        # timed by events, as waiting for it would leave the GPU idle while the next pack is queued
        clock = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if dev.type == "cuda" else None
        if clock:
            clock[0].record()
        for pi, (pack, tokens, cu) in enumerate(prefetch(self.tokenizer, sequences, plan.packs, self.device)):
            self._run(pack, int(first_item[pi]), tokens, cu, outputs, sink)
            if pi == 0:
                if clock:
                    clock[1].record()
                else:
                    first_pack_s = time.perf_counter() - t0
            tokens_done += pack.tokens
            if on_pack is not None:
                on_pack(tokens_done)
            now = time.perf_counter()
            if now - last > progress_every:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                rate = tokens_done / (now - t0)
                log.info(
                    "pack %d/%d, %d/%d tokens, %.0f tokens/s, ETA %.0f s",
                    pi + 1, len(plan.packs), tokens_done, total_tokens, rate, (total_tokens - tokens_done) / max(rate, 1e-9),
                )
                last = now

        # windows of a split record -> one row, averaged weighted by residues
        rec_t = torch.as_tensor(item_record, device=dev)
        w = torch.as_tensor(item_len, dtype=torch.float32, device=dev)[:, None]
        pooled = {}
        for col, rows in item_rows.items():
            acc = torch.zeros(plan.n_records, dim, dtype=torch.float32, device=dev).index_add_(0, rec_t, rows * w)
            wsum = torch.zeros(plan.n_records, 1, dtype=torch.float32, device=dev).index_add_(0, rec_t, w)
            pooled[col] = acc / wsum.clamp(min=1)  # copied to the host when first read (EmbedResult.pooled)
        per_residue = {
            col: _merge_residues(parts, item_record, item_start, item_len, plan.n_records, dim) for col, parts in residue_parts.items()
        }
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            if plan.packs:
                first_pack_s = clock[0].elapsed_time(clock[1]) / 1e3
        elapsed = time.perf_counter() - t0
        stats = {
            "records": plan.n_records,
            "packs": len(plan.packs),
            "tokens": total_tokens,
            "seconds": elapsed,
            "tokens_per_s": total_tokens / elapsed if elapsed > 0 else 0.0,
            "first_pack_seconds": first_pack_s,
            "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
            "dtype": self.dtype_name,
            "attention_backend": self.backend,
            "gelu": self.packed.gelu,
            "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        }
        ready = None
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(dev))
        return EmbedResult(pooled, per_residue, stats, ready)


def _merge_residues(parts: dict[int, torch.Tensor], item_record, item_start, item_len, n_records: int, dim: int) -> list[np.ndarray]:
    """Per-residue states per record; overlapping windows are averaged position by position."""
    lengths = np.zeros(n_records, dtype=np.int64)
    np.maximum.at(lengths, item_record, item_start + item_len)
    sums = [np.zeros((n, dim), np.float32) for n in lengths]
    counts = [np.zeros((n, 1), np.float32) for n in lengths]
    for i, t in parts.items():
        r, s, n = int(item_record[i]), int(item_start[i]), int(item_len[i])
        sums[r][s : s + n] += t.numpy()
        counts[r][s : s + n] += 1
    return [s / np.maximum(c, 1) for s, c in zip(sums, counts)]


def build_embedder(loaded: LoadedModel, device: str, options) -> Embedder:
    """The engine as the options configure it (``embedding.dtype``, float32 on the CPU; ``embedding.attention``,
    ``embedding.gelu``), with the model on ``device``: what the embed and spot-check stages build."""
    e = options.embedding
    return Embedder(loaded, device, compute_dtype(device, e.dtype), e.attention, e.gelu)

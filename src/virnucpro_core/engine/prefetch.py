"""Packs prepared ahead: a thread tokenises the next packs into pinned memory while the GPU works,
and the consumer copies them to the device asynchronously."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch

from .packing import Pack
from .tokenizer import Tokenizer


def prefetch(tokenizer: Tokenizer, sequences: list[str], packs: list[Pack], device: torch.device,
             depth: int = 4) -> Iterator[tuple[Pack, torch.Tensor, torch.Tensor]]:
    """Yield (pack, tokens, cu_seqlens) on ``device``, in order; errors of the thread are raised here.

    The first pack is tokenised in the calling thread, and the thread starts when the second is asked for (the
    first one's forward queued): handed over by a thread still tokenising, a pack reaches the caller when that
    thread releases the GIL (at the latest after CPython's 5 ms switch interval), with the GPU idle."""
    pin = device.type == "cuda"

    def host(pack: Pack) -> tuple[Pack, torch.Tensor, torch.Tensor]:
        t, c = torch.from_numpy(tokenizer.pack_tokens(sequences, pack)), torch.from_numpy(pack.cu_seqlens)
        return (pack, t.pin_memory(), c.pin_memory()) if pin else (pack, t, c)

    def on_device(pack: Pack, t: torch.Tensor, c: torch.Tensor) -> tuple[Pack, torch.Tensor, torch.Tensor]:
        return pack, t.to(device, non_blocking=True), c.to(device, non_blocking=True)

    if not packs:
        return
    yield on_device(*host(packs[0]))
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for pack in packs[1:]:
                if stop.is_set():
                    return
                q.put(host(pack))
        except BaseException as exc:  # surfaced in the consumer
            q.put(exc)
            return
        q.put(None)

    thread = threading.Thread(target=work, daemon=True, name="pack-prefetch")
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=1.0)
            except queue.Empty:
                if thread.is_alive():
                    continue
                try:  # it may have handed over its last item as it ended
                    item = q.get_nowait()
                except queue.Empty:
                    raise RuntimeError("the pack prefetch thread ended without handing over its packs") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield on_device(*item)
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)

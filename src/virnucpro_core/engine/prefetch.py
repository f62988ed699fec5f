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
    """Yield (pack, tokens, cu_seqlens) on ``device``, in order; errors of the thread are raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    pin = device.type == "cuda"
    stop = threading.Event()

    def work():
        try:
            for pack in packs:
                if stop.is_set():
                    return
                t = torch.from_numpy(tokenizer.pack_tokens(sequences, pack))
                c = torch.from_numpy(pack.cu_seqlens)
                if pin:
                    t, c = t.pin_memory(), c.pin_memory()
                q.put((pack, t, c))
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
            pack, t, c = item
            yield pack, t.to(device, non_blocking=True), c.to(device, non_blocking=True)
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)

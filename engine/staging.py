"""Host-to-GPU copies of input weights through pinned buffers, on a copy stream of their own.

ComfyUI keeps a model it has not loaded in ordinary (pageable) host memory, and a copy from there
is staged by the driver synchronously: ~8 GB/s on an H100 machine against ~55 GB/s from pinned
memory (bench/bench_cuda.py measures both). The mover copies each tensor on the CPU into one of
a ring of pinned buffers and queues the pinned-to-GPU copy without waiting: the next piece is
copied on the CPU while the previous one crosses the bus. A buffer is reused only after the
event recorded behind its last copy has passed.

The copies run on a stream of their own, so the bus works while the caller's stream computes on
earlier pieces (on one stream each copy waited for the Gram products queued before it). The
caller's stream waits for the copy's event before anything it queues next, and each device tensor
is allocated on the copy stream and marked as used by the caller's stream (record_stream), so the
caching allocator never hands its memory out while either stream may still use it. The copy
stream runs at most LAG pieces ahead of the caller's stream (it waits for the caller's work queued
LAG pieces earlier), and the CPU at most PIECES pieces ahead of the copies (the ring's events): so
a GPU that computes slower than the bus delivers holds a bounded number of pieces, not the models.
"""
from __future__ import annotations

import threading
from collections import deque

import torch

PIECE = 16 << 20  # bytes per pinned buffer
PIECES = 4
LAG = 8  # pieces the copies may run ahead of the caller's stream

_lock = threading.Lock()


class _Ring:
    """The process's pinned buffers (64 MiB, made on first use), the event behind each one's
    last copy, and a copy stream per device: shared by every Mover, so no buffer is overwritten
    while a copy still reads it, whichever merge queued that copy (a cancelled one too)."""

    def __init__(self):
        self.buffers = [torch.empty(PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(PIECES)]
        self.events: list[torch.cuda.Event | None] = [None] * PIECES
        self.next = 0
        self.streams: dict[int, torch.cuda.Stream] = {}

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.streams:
            self.streams[index] = torch.cuda.Stream(device=index)
        return self.streams[index]


_ring: _Ring | None = None


def _the_ring() -> _Ring:
    global _ring
    with _lock:
        if _ring is None:
            _ring = _Ring()
        return _ring


class Mover:
    """mover(t) -> t on the GPU `device` (t itself when already there), ready in the order of the
    stream that is current when it is called."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.ring = _the_ring()
        with _lock:
            self.copy_stream = self.ring.stream(self.device)
        self._marks: deque = deque()  # per piece sent: the caller's work queued by then

    def many(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Move several tensors, packing the small ones into shared pieces: one CPU copy each but
        one host-to-GPU copy (and one event) per piece, not per tensor. The results of one piece
        are views of one device buffer (each at a 16-byte aligned offset)."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        group: list[tuple[int, int]] = []  # (index, byte offset in the piece)
        used = 0

        def flush():
            nonlocal group, used
            if group:
                dev_buf = self._empty(used)
                sources = [(tensors[j].reshape(-1).view(torch.uint8), a) for j, a in group]
                self._send(sources, used, dev_buf)
                for j, a in group:
                    t = tensors[j]
                    out[j] = dev_buf[a:a + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            group, used = [], 0

        for i, t in enumerate(tensors):
            size = t.numel() * t.element_size()
            if (t.device == self.device or t.device.type != "cpu" or not t.is_contiguous()
                    or size == 0 or size > PIECE // 2):
                out[i] = self(t)
                continue
            if used + size > PIECE:
                flush()
            group.append((i, used))
            used = (used + size + 15) // 16 * 16
        flush()
        return out

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return t.to(self.device, non_blocking=True)
        src = t.reshape(-1).view(torch.uint8)
        dst = self._empty(src.numel())
        for a in range(0, src.numel(), PIECE):
            e = min(src.numel(), a + PIECE)
            self._send([(src[a:e], 0)], e - a, dst[a:e])
        return dst.view(t.dtype).view(t.shape)

    def _empty(self, nbytes: int) -> torch.Tensor:
        """Device bytes written on the copy stream and read on the caller's."""
        with torch.cuda.stream(self.copy_stream):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        buf.record_stream(torch.cuda.current_stream(self.device))
        return buf

    def _send(self, sources, nbytes: int, dst: torch.Tensor) -> None:
        """One ring step: the (uint8 tensor, byte offset) sources into the next pinned buffer on
        the CPU, its first nbytes to dst on the copy stream; the caller's stream waits for it."""
        ring = self.ring
        caller = torch.cuda.current_stream(self.device)
        mark = torch.cuda.Event()
        mark.record(caller)
        self._marks.append(mark)
        with _lock:
            i = ring.next
            ring.next = (i + 1) % PIECES
            if ring.events[i] is not None:
                ring.events[i].synchronize()  # its last copy to the GPU has finished
            buf = ring.buffers[i]
            for src, a in sources:
                buf[a:a + src.numel()].copy_(src)
            with torch.cuda.stream(self.copy_stream):
                if len(self._marks) > LAG:  # not more than LAG pieces ahead of the caller
                    self.copy_stream.wait_event(self._marks.popleft())
                dst.copy_(buf[:nbytes], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            ring.events[i] = ev
        caller.wait_event(ev)


GROUP_BYTES = 8 << 20  # keys moved together: half a piece


def moved_groups(per_key: list[list[torch.Tensor]], move: Mover, group_bytes: int = GROUP_BYTES):
    """(j, the tensors of key j on the GPU) in key order, consecutive keys moved together up to
    group_bytes: small keys then cost one host-to-GPU copy per group, not one per key and input."""
    group, size = [], 0
    for j, tensors in enumerate(per_key + [None]):
        if tensors is not None:
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            if not group or size + nbytes <= group_bytes:
                group.append(j)
                size += nbytes
                continue
        moved = move.many([t for g in group for t in per_key[g]])
        at = 0
        for g in group:
            yield g, moved[at:at + len(per_key[g])]
            at += len(per_key[g])
        if tensors is not None:
            group, size = [j], nbytes


def mover(device: torch.device):
    """A Mover for a CUDA device, else None (plain .to())."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return Mover(device)
    except RuntimeError:  # pinned memory refused (limits, a broken driver): plain copies
        return None

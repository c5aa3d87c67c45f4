"""Host-to-GPU copies of input weights through pinned buffers.

ComfyUI keeps a model it has not loaded in ordinary (pageable) host memory, and a copy from there
is staged by the driver synchronously: ~8 GB/s on an H100 machine against ~55 GB/s from pinned
memory (bench/bench_cuda.py measures both). The mover copies each tensor on the CPU into one of
a ring of pinned buffers and queues the pinned-to-GPU copy without waiting: the next piece is
copied on the CPU while the previous one crosses the bus. A buffer is reused only after the
event recorded behind its last copy has passed. The device tensor it returns is a new tensor,
ready in stream order for whatever the caller queues next.
"""
from __future__ import annotations

import threading

import torch

PIECE = 16 << 20  # bytes per pinned buffer
PIECES = 4

_lock = threading.Lock()


class _Ring:
    """The process's pinned buffers (64 MiB, made on first use) and the event behind each one's
    last copy: shared by every Mover, so no buffer is overwritten while a copy still reads it,
    whichever merge queued that copy (a cancelled one too)."""

    def __init__(self):
        self.buffers = [torch.empty(PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(PIECES)]
        self.events: list[torch.cuda.Event | None] = [None] * PIECES
        self.next = 0


_ring: _Ring | None = None


def _the_ring() -> _Ring:
    global _ring
    with _lock:
        if _ring is None:
            _ring = _Ring()
        return _ring


class Mover:
    """mover(t) -> t on the GPU `device` (t itself when already there)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.ring = _the_ring()

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
                self._piece(tensors, group, used, out)
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

    def _piece(self, tensors, group, used, out) -> None:
        ring = self.ring
        dev_buf = torch.empty(used, dtype=torch.uint8, device=self.device)
        with _lock:
            i = ring.next
            ring.next = (i + 1) % PIECES
            if ring.events[i] is not None:
                ring.events[i].synchronize()
            buf = ring.buffers[i]
            for j, a in group:
                t = tensors[j]
                buf[a:a + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
            with torch.cuda.device(self.device):
                dev_buf.copy_(buf[:used], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
            ring.events[i] = ev
        for j, a in group:
            t = tensors[j]
            n = t.numel() * t.element_size()
            out[j] = dev_buf[a:a + n].view(t.dtype).view(t.shape)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return t.to(self.device, non_blocking=True)
        ring = self.ring
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        src = t.reshape(-1).view(torch.uint8)
        dst = out.reshape(-1).view(torch.uint8)
        with _lock:
            for a in range(0, src.numel(), PIECE):
                e = min(src.numel(), a + PIECE)
                i = ring.next
                ring.next = (i + 1) % PIECES
                if ring.events[i] is not None:
                    ring.events[i].synchronize()  # its last copy to the GPU has finished
                buf = ring.buffers[i][: e - a]
                buf.copy_(src[a:e])
                with torch.cuda.device(self.device):
                    dst[a:e].copy_(buf, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                ring.events[i] = ev
        return out


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

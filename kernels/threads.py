"""Threads for the CPU Gram pass: torch's intra-op thread count for a block of code, and the pass's
own worker threads."""
from __future__ import annotations

import contextlib
import queue
import threading

import torch

# entries of a key per worker item of the tensor methods (sign-elected median: its passes; the
# element median: ranges of a key). SD1.5's largest keys (14.7M entries) as one item each kept one
# core busy of several, or left the others idle behind them. A quarter of SD1.5's keys, 3 inputs +
# base, 2 threads: sign-elected fp16 2.74 -> 2.20 s (2^20: 2.35), fp32 3.26 -> 2.68, drop 0.3
# 7.34 -> 6.40 s
PART_ELEMS = 1 << 21


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run the block with n intra-op threads (None: as it is), then restore the count."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class WorkItem:
    """fn(arg) to run on a worker; `held`: it keeps copies made for it referenced until done.
    It runs in the submitter's inference mode (thread-local in torch; ComfyUI runs nodes in it,
    and a worker outside it may not update the tensors made there in place)."""

    __slots__ = ("fn", "arg", "held", "done", "error", "cancelled", "inference", "value")

    def __init__(self, fn, arg, held: bool):
        self.fn, self.arg, self.held = fn, arg, held
        self.inference = torch.is_inference_mode_enabled()
        self.done = self.cancelled = False
        self.error: BaseException | None = None
        self.value = None  # what fn returned

    def result(self):
        """fn's return value, or its error raised (call once it is done)."""
        if self.error is not None:
            raise self.error
        return self.value


class WorkerThreads:
    """n threads taking items from one queue (a busy core slows its item, the other threads go on).
    The caller waits for a given item (wait_for); a worker wakes it only when that item is done,
    not at every item: a wake switches a core away from a worker. (concurrent.futures' pool does
    more per item: with a single wait for all items it ran the Gram pass over the big keys of the
    tiny test models 6-8% slower than threads given their keys up front.)"""

    def __init__(self, n: int, name: str = "gram"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._awaited: WorkItem | None = None
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn, arg, held: bool = True) -> WorkItem:
        item = WorkItem(fn, arg, held)
        self._queue.put(item)
        return item

    def wait_for(self, item: WorkItem) -> None:
        with self._cond:
            while not item.done:
                self._awaited = item
                self._cond.wait()
            self._awaited = None

    def close(self) -> None:
        """Cancel the items not started, let the running ones end, and end the threads."""
        if not self._threads:
            return
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.cancelled = item.done = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                with torch.inference_mode(item.inference):
                    item.value = item.fn(item.arg)
            except BaseException as e:  # handed to the caller, in its order
                item.error = e
            item.arg = None  # drop the inputs now, not when the caller collects the item
            with self._cond:
                item.done = True
                if self._awaited is item:
                    self._cond.notify()

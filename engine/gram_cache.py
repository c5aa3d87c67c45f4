"""Per-key Grams of recent merges, reused when the very same inputs are merged again.

A mixer re-queues a merge with other weights, scope or solver settings far more often than with
other models; the Grams (the one read of every input) depend on none of those. So the last few
Gram passes are kept (a few KB each) and reused when every input is the same ComfyUI object
holding the same weights and patches: the same assumption ComfyUI's own node cache makes about
an upstream output that did not re-run. What "the same" means here:
- the same ModelPatcher / CLIP objects (weak references: a dead object never matches, and its
  id cannot be mistaken for a new object's);
- per key, the same stored tensor (data pointer, dtype, shape) and the same patch entries
  (object identity: add_patches makes new ones), and the patcher's patches_uuid;
- the same keys, Gram kind (full / centred), compute device and CPU kernel.
A reused Gram is the one the pass would compute again (the pass is deterministic), so results do
not change, only the time. BARYCENTER_GRAM_CACHE=0 turns it off (benchmarks of the cold path).
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

import torch

ENV = "BARYCENTER_GRAM_CACHE"
SIZE = 8

_lock = threading.Lock()
_entries: OrderedDict = OrderedDict()  # key -> (weak references, grams)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _identity(source, keys) -> tuple:
    parts = []
    for k in keys:
        entry = source.entries[k]
        w = source.stored(k)
        parts.append((w.data_ptr(), w.dtype, tuple(w.shape), tuple(id(p) for p in entry[1:])))
    return (id(source.owner), id(source.patcher), str(getattr(source.patcher, "patches_uuid", "")), hash(tuple(parts)))


def key_of(sources, base, keys, device, full: bool, kernel: str):
    """The cache key of one Gram pass, with the objects it refers to; None when off."""
    if not enabled():
        return None
    inputs = list(sources) + ([base] if base is not None else [])
    try:
        refs = [(weakref.ref(s.owner), weakref.ref(s.patcher)) for s in inputs]
        identities = tuple(_identity(s, keys) for s in inputs)
    except (TypeError, RuntimeError, NotImplementedError):
        return None  # no weak references, or a tensor type without a data pointer: not cached
    return (identities, base is not None, tuple(keys), bool(full), str(device), kernel), refs, inputs


def lookup(handle) -> torch.Tensor | None:
    if handle is None:
        return None
    key, _, inputs = handle
    with _lock:
        hit = _entries.get(key)
        if hit is None:
            return None
        refs, grams = hit
        if any(o() is not s.owner or p() is not s.patcher for (o, p), s in zip(refs, inputs)):
            del _entries[key]
            return None
        _entries.move_to_end(key)
        return grams.clone()


def store(handle, grams: torch.Tensor) -> None:
    if handle is None:
        return
    key, refs, _ = handle
    with _lock:
        _entries[key] = (refs, grams)
        _entries.move_to_end(key)
        while len(_entries) > SIZE:
            _entries.popitem(last=False)


def clear() -> None:
    with _lock:
        _entries.clear()

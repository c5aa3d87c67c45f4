"""The Gram pass over all keys of a model: gram_matrix per key, with small keys batched on CPU.

A UNet holds hundreds of small keys (biases, norms: SD1.5 has 686 keys, 410 of them under 2^16
elements). Per key, gram_matrix costs some 40 tiny torch ops and a host sync: on CPU about as
much time over all the small keys as the whole data pass over the large ones. So keys of at most
SMALL_KEY elements are gathered until they fill one CPU chunk and done together:

- each input's keys are concatenated into one fp32 row (torch.cat converts on the way), pivoted
  as in gram_matrix (b_0 = p_1, b_i = x_{i+1} - x_1; the base subtracted from b_0 for norms);
- every needed product b_r·b_s is formed elementwise in fp32 (the same rounding as the matmul's
  products) and summed per key in fp64 by index_add (sequential on CPU: deterministic);
- one host sync per batch checks every key as gram_matrix does (non-finite, tiny Grams, points
  near zero, a non-finite base that cancels in the differences); a flagged key is recomputed by
  gram_matrix itself, which names the input or rescales or makes zero points exact.
Results equal gram_matrix's up to fp64 summation order (~1e-7 relative at worst, from fp32
products, as there). On CUDA every key goes through gram_matrix (its chunks are 2^24 elements and
index_add there is not deterministic).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from .gram import CPU_CHUNK, TINY_GRAM, gram_matrix, pivot_map

SMALL_KEY = 1 << 16
_BATCHABLE = (torch.float32, torch.float16, torch.bfloat16)


class GramPass:
    """Collects per-key Grams in key order: add(j, xs, base, key) for each key, then result().

    workers > 1 (CPU): each work item (a large key, or a batch of small ones) is computed on one
    of `workers` threads, each torch op single-threaded (the caller sets torch's intra-op threads
    to 1). Items and their arithmetic do not depend on the thread, so the Grams are bit-identical
    to workers=1, and so is the first error raised (items are waited for in the order made).
    Python threads instead of OpenMP: a busy core slows one item down instead of stalling every op
    at a barrier. At most 2·workers items are in flight (the inputs they read stay referenced until
    done). close() (or result()) ends the threads."""

    def __init__(self, n_keys: int, *, full: bool = True, workers: int = 1):
        self.full = full
        self.grams: list[torch.Tensor | None] = [None] * n_keys
        self._pending: list[tuple[int, list, torch.Tensor | None, str]] = []
        self._pending_elems = 0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="gram") if workers > 1 else None
        self._inflight: deque = deque()
        self._limit = 2 * workers

    def add(self, j: int, xs, base=None, key: str = "tensor") -> None:
        x0 = xs[0]
        if (x0.device.type == "cpu" and len(xs) > 1 and 0 < x0.numel() <= SMALL_KEY
                and all(x.dtype in _BATCHABLE for x in xs) and (base is None or base.dtype in _BATCHABLE)):
            if self._pending and (base is None) != (self._pending[0][2] is None):
                self.flush()
            self._pending.append((j, list(xs), base, key))
            self._pending_elems += x0.numel()
            if self._pending_elems >= CPU_CHUNK:
                self.flush()
        else:
            self._run(self._one_key, [(j, list(xs), base, key)])

    def flush(self) -> None:
        if self._pending:
            items, self._pending, self._pending_elems = self._pending, [], 0
            self._run(self._batch, items)

    def result(self) -> torch.Tensor:
        try:
            self.flush()
            while self._inflight:
                self._inflight.popleft().result()
            return torch.stack(self.grams)
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _run(self, fn, items) -> None:
        if self._pool is None:
            fn(items)
            return
        while len(self._inflight) >= self._limit:
            self._inflight.popleft().result()  # oldest first: errors in key order
        self._inflight.append(self._pool.submit(fn, items))

    def _one_key(self, items) -> None:
        (j, xs, base, key), = items
        self.grams[j] = gram_matrix(xs, base, key=key, full=self.full)

    def _batch(self, items) -> None:
        grams, redo = _batch_grams([it[1] for it in items], [it[2] for it in items], self.full)
        for (j, xs, base, key), g, again in zip(items, grams, redo):
            self.grams[j] = gram_matrix(xs, base, key=key, full=self.full) if again else g


def _batch_grams(groups, bases, full: bool):
    """(K augmented Grams, K flags 'recompute with gram_matrix'), as gram_matrix would give them."""
    n, k = len(groups[0]), len(groups)
    has_base = bases[0] is not None
    lengths = [xs[0].numel() for xs in groups]
    total = sum(lengths)
    rows = n + (1 if has_base else 0)
    b = torch.empty(rows, total, dtype=torch.float32)
    for i in range(n):
        torch.cat([xs[i].reshape(-1) for xs in groups], out=b[i])
    if has_base:
        torch.cat([x.reshape(-1) for x in bases], out=b[n])
    b[1:n].sub_(b[0])
    if full and has_base:
        b[0].sub_(b[n])
    first = 0 if full else 1
    r = torch.arange(first, n)
    ii, jj = torch.triu_indices(len(r), len(r))
    ids = torch.repeat_interleave(torch.arange(k), torch.tensor(lengths))
    sums = torch.zeros(len(ii), k, dtype=torch.float64)
    prod = torch.empty(total, dtype=torch.float32)
    for p, (u, v) in enumerate(zip(r[ii].tolist(), r[jj].tolist())):  # a pair at a time: O(1) rows of memory
        torch.mul(b[u], b[v], out=prod)
        sums[p].index_add_(0, ids, prod.to(torch.float64))
    beta = torch.zeros(k, n, n, dtype=torch.float64)
    beta[:, r[ii], r[jj]] = sums.T
    beta[:, r[jj], r[ii]] = sums.T
    # the checks gram_matrix makes per key, for the whole batch in one host sync
    d = beta.diagonal(dim1=1, dim2=2)
    bad = ~torch.isfinite(beta).flatten(1).all(1)
    if has_base and not full:  # the base cancels in the differences: look at it directly
        seg_bad = torch.zeros(k, dtype=torch.float64).index_add_(0, ids, (~torch.isfinite(b[n])).double())
        bad |= seg_bad > 0
    tiny = d.abs().amax(1) < TINY_GRAM
    flags = bad | tiny
    if full:
        sq = torch.cat([d[:, :1], d[:, :1] + 2 * beta[:, 0, 1:] + d[:, 1:]], 1)
        top = sq.amax(1, keepdim=True)
        flags |= ((sq <= 1e-4 * top).any(1) & (top[:, 0] > 0))
    t = pivot_map(n)
    g = t @ beta @ t.T
    if full:
        g[:, 0, 0].clamp_min_(0.0)
    else:
        g[:, 0, :] = 0.0
        g[:, :, 0] = 0.0
        g[:, 0, 0] = -1.0
    return g.unbind(0), flags.tolist()

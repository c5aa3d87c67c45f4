"""The Gram pass over all keys of a model: gram_matrix per key, with small and medium keys batched on CPU.

A UNet holds hundreds of small keys (biases, norms: SD1.5 has 686 keys, 410 of them under 2^16
elements). Per key, gram_matrix costs some 40 tiny torch ops and a host sync: on CPU about as
much time over all the small keys as the whole data pass over the large ones. So keys of at most
SMALL_KEY elements are gathered until they fill one CPU chunk and done together:

- each input's keys are concatenated into one fp32 row (torch.cat converts on the way), pivoted
  as in gram_matrix (b_0 = p_1, b_i = x_{i+1} - x_1; the base subtracted from b_0 for norms);
- every needed product b_r·b_s is formed elementwise in fp32 (the same rounding as the matmul's
  products) and summed per key in fp64 by numpy's add.reduceat over the keys' contiguous
  segments (pairwise within a key, no threads: deterministic; 10x faster than index_add);
- one host sync per batch checks every key as gram_matrix does (non-finite, tiny Grams, points
  near zero, a non-finite base that cancels in the differences); a flagged key is recomputed by
  gram_matrix itself, which names the input or rescales or makes zero points exact.
Keys above SMALL_KEY that fit in one CPU chunk (medium keys: SD1.5's 320x320 attention weights and
the like) are gathered too, each starting at a sub-block of the chunk buffer: per key only the
differences are written (from fp32 inputs) or the inputs converted, then one bmm over the
batch's sub-blocks gives every sub-block's fp32 products, summed per key in fp64 by reduceat (a
key's last sub-block padded with zeros). Per key that replaces some 40 tiny torch ops, which on
CPU run under the GIL and kept two pass threads from going faster than one on such keys (the
big keys of the tiny test models: 116 keys, one thread 66 -> 57 ms, two 50 -> 38 ms).
Results equal gram_matrix's up to summation order: fp32 products summed in fp64 come within
~1e-9 of exact, gram_matrix's fp32 sub-block sums within ~1e-6 of the largest entry (gram.py).

On a GPU (given `reread`, as the engine does) the pass never waits for the device: per key the
pivoted products are formed as in gram_matrix but left on the GPU; small keys are batched in a
layout padded with zeros to whole SUB_BLOCKs (one bmm for the batch, then an exact 0/1 fp64
matmul sums each key's sub-blocks: no atomics, so deterministic); the checks gram_matrix makes
per key run once for all keys at the end (one host sync), and a flagged key is read again
(`reread`) and given to gram_matrix, which names the input or rescales or makes zero points
exact. On CPU with `reread` the keys done one at a time (large ones) likewise keep only their
pivoted products; their checks and map run once at the end (the same bits as per key: the map is
the same fp64 product batched, and a flagged key is recomputed by gram_matrix as before; node
time on the tiny test models -10%, at SD1.5 shapes a few %). Without `reread` every key goes
through gram_matrix (one host sync per key).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from . import fused
from .gram import (CPU_CHUNK, SHORT_POINT, SUB_BLOCK, TINY_GRAM, fp32_matmul, gram_chunk, gram_matrix,
                   map_pivoted, pivoted_products, scratch)
from .threads import WorkerThreads

SMALL_KEY = 1 << 16
RUN_AHEAD = 8  # items in flight per worker when they hold no copies; the caller then waits
WAKE_AT = 2  # until this many per worker are left
DEVICE_BATCH = 1 << 22  # elements of small keys per batch on a GPU (a 4-row fp32 batch: 64 MiB)
_BATCHABLE = (torch.float32, torch.float16, torch.bfloat16)


class GramPass:
    """Collects per-key Grams in key order: add(j, xs, base, key) for each key, then result().

    workers > 1 (CPU): each work item (a large key, or a batch of small ones) is computed on one
    of `workers` threads, each torch op single-threaded (the caller sets torch's intra-op threads
    to 1). Items and their arithmetic do not depend on the thread, so the Grams are bit-identical
    to workers=1, and so is the first error raised (items are waited for in the order made; keys
    whose checks wait for result() raise there, in key order).
    Python threads instead of OpenMP: a busy core slows one item down instead of stalling every op
    at a barrier. At most 2·workers items holding copies (add's `held`: the inputs they read stay
    referenced until done) are in flight; items that only reference the models' own tensors run up
    to RUN_AHEAD·workers ahead, and the caller then waits until WAKE_AT·workers are left: one wake
    for many items (each wake takes a core from a worker: waking per item made the pass ~12%
    slower on 2 cores). close() (or result()) ends the threads."""

    def __init__(self, n_keys: int, *, full: bool = True, workers: int = 1, reread=None,
                 deferred: bool | None = None):
        """reread(j) -> (xs, base): key j's inputs once more, for the deferred checks. deferred
        (small keys batched for the device too): None = on a GPU when reread is given; True also
        on CPU (tests of that path)."""
        self.full = full
        self.grams: list[torch.Tensor | None] = [None] * n_keys
        self._pending: list[tuple[int, list, torch.Tensor | None, str]] = []
        self._pending_elems = 0
        self._pending_held = False
        self._medium: list[tuple[int, list, torch.Tensor | None, str]] = []  # medium keys (module docstring)
        self._medium_elems = 0
        self._medium_held = False
        self._medium_kind: tuple[bool, bool] | None = None  # the pending medium batch's _medium_kind
        self._pool = WorkerThreads(workers) if workers > 1 else None
        self._inflight: deque = deque()  # work items in the order made
        self._workers = workers
        self.reread = reread
        self._deferred = deferred
        self._betas: dict[int, tuple[torch.Tensor, torch.Tensor | None, str]] = {}

    def _defers(self, device: torch.device) -> bool:
        if self._deferred is None:
            return self.reread is not None and device.type != "cpu"
        return self._deferred

    @fp32_matmul
    def add(self, j: int, xs, base=None, key: str = "tensor", held: bool = True) -> None:
        """held=False: xs and base are the models' own tensors (no copies made for this pass)."""
        x0 = xs[0]
        defer = self._defers(x0.device)
        batchable = (len(xs) > 1 and 0 < x0.numel() <= SMALL_KEY and all(x.dtype in _BATCHABLE for x in xs)
                     and (base is None or base.dtype in _BATCHABLE))
        if batchable and (defer or x0.device.type == "cpu"):
            if self._pending and (base is None) != (self._pending[0][2] is None):
                self.flush()
            self._pending.append((j, list(xs), base, key))
            self._pending_elems += x0.numel()
            self._pending_held = self._pending_held or held
            if self._pending_elems >= (DEVICE_BATCH if defer else CPU_CHUNK):
                self.flush()
        elif defer:
            self._defer_key(j, list(xs), base, key)
        elif _is_medium(xs, base):
            self._add_medium(j, list(xs), base, key, held)
        elif self.reread is not None:  # CPU: the products now, the checks and the map at result()
            self._run(self._products_only, [(j, list(xs), base, key)], held)
        else:
            self._run(self._one_key, [(j, list(xs), base, key)], held)

    def _add_medium(self, j, xs, base, key, held) -> None:
        size = _padded(xs[0].numel())
        kind = _medium_kind(xs, base, self.full)
        if self._medium and (kind != self._medium_kind or self._medium_elems + size > _medium_capacity(xs, base)):
            self._flush_medium()
        self._medium_kind = kind
        self._medium.append((j, xs, base, key))
        self._medium_elems += size
        self._medium_held = self._medium_held or held

    def _flush_medium(self) -> None:
        if self._medium:
            items, self._medium, self._medium_elems = self._medium, [], 0
            held, self._medium_held = self._medium_held, False
            self._run(self._medium_batch, items, held)

    @fp32_matmul
    def flush(self) -> None:
        self._flush_medium()
        if self._pending:
            items, self._pending, self._pending_elems = self._pending, [], 0
            held, self._pending_held = self._pending_held, False
            if self._defers(items[0][1][0].device):
                self._defer_batch(items)
            else:
                self._run(self._batch, items, held)

    def result(self) -> torch.Tensor:
        try:
            self.flush()
            while self._inflight:
                self._wait(self._inflight[0])
            if self._betas:
                self._finish_deferred()
            return torch.stack(self.grams)
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _run(self, fn, items, held: bool = True) -> None:
        if self._pool is None:
            fn(items)
            return
        q = self._inflight
        self._collect()
        while held:  # copies in flight: wait for the oldest until fewer than 2·workers remain
            waiting = [it for it in q if it.held and not it.done]
            if len(waiting) < 2 * self._workers:
                break
            self._wait(waiting[0])
        if len(q) >= RUN_AHEAD * self._workers:
            self._wait(q[len(q) - WAKE_AT * self._workers - 1])
            while len(q) >= RUN_AHEAD * self._workers:  # an older item still running
                self._wait(q[0])
        q.append(self._pool.submit(fn, items, held))

    def _wait(self, item) -> None:
        """Sleep until `item` is done, then collect."""
        self._pool.wait_for(item)
        self._collect()

    def _collect(self) -> None:
        """Take the finished items off the front, oldest first: errors raise in key order."""
        q = self._inflight
        while q and q[0].done:
            q.popleft().result()

    def _one_key(self, items) -> None:
        (j, xs, base, key), = items
        self.grams[j] = gram_matrix(xs, base, key=key, full=self.full)

    def _products_only(self, items) -> None:
        (j, xs, base, key), = items
        self._defer_key(j, xs, base, key)

    def _batch(self, items) -> None:
        grams, redo = _batch_grams([it[1] for it in items], [it[2] for it in items], self.full)
        self._keep_checked(items, grams, redo)

    def _keep_checked(self, items, grams, redo) -> None:
        for (j, xs, base, key), g, again in zip(items, grams, redo):
            self.grams[j] = gram_matrix(xs, base, key=key, full=self.full) if again else g

    @fp32_matmul
    def _medium_batch(self, items) -> None:
        betas, base_bad = _medium_batch_products([it[1] for it in items], [it[2] for it in items], self.full)
        if self.reread is not None:  # checked with the other keys at result()
            for k, (j, _, _, key) in enumerate(items):
                self._betas[j] = (betas[k], None if base_bad is None else base_bad[k], key)
            return
        flags = batch_flags(betas, self.full)
        if base_bad is not None:
            flags |= base_bad
        self._keep_checked(items, map_pivoted(betas, self.full).unbind(0), flags.tolist())

    # ---- deferred (GPU): nothing here waits for the device until _finish_deferred
    def _defer_key(self, j, xs, base, key) -> None:
        beta = pivoted_products(xs, base, full=self.full)
        base_bad = None
        if base is not None and not self.full:  # the base cancels in the differences: look at it
            readable = base if base.dtype in _BATCHABLE + (torch.float64,) else base.float()  # fp8: no isfinite
            base_bad = ~torch.isfinite(readable).all()
        self._betas[j] = (beta, base_bad, key)

    def _defer_batch(self, items) -> None:
        betas, base_bad = _padded_batch_products([it[1] for it in items], [it[2] for it in items], self.full)
        for k, (j, _, _, key) in enumerate(items):
            self._betas[j] = (betas[k], None if base_bad is None else base_bad[k], key)

    @fp32_matmul
    def _finish_deferred(self) -> None:
        order = sorted(self._betas)
        beta = torch.stack([self._betas[j][0] for j in order])
        flags = batch_flags(beta, self.full)
        bases = [self._betas[j][1] for j in order]
        if any(b is not None for b in bases):
            flags |= torch.stack([b if b is not None else torch.zeros((), dtype=torch.bool, device=beta.device)
                                  for b in bases])
        redo = flags.tolist()  # the one host sync of the pass
        g = map_pivoted(beta, self.full)
        for j, gj, again in zip(order, g.unbind(0), redo):
            if again:
                xs, base = self.reread(j)
                gj = gram_matrix(xs, base, key=self._betas[j][2], full=self.full)
            self.grams[j] = gj
        self._betas.clear()


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
    starts = np.cumsum([0] + lengths[:-1])

    def key_sums(v: torch.Tensor) -> torch.Tensor:  # (total,) -> (K,) fp64: each key's segment summed
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf of overflowing keys: flagged below
            return torch.from_numpy(np.add.reduceat(v.numpy(), starts, dtype=np.float64))

    sums = torch.empty(len(ii), k, dtype=torch.float64)
    prod = torch.empty(total, dtype=torch.float32)
    for p, (u, v) in enumerate(zip(r[ii].tolist(), r[jj].tolist())):  # a pair at a time: O(1) rows of memory
        torch.mul(b[u], b[v], out=prod)
        sums[p] = key_sums(prod)
    beta = torch.zeros(k, n, n, dtype=torch.float64)
    beta[:, r[ii], r[jj]] = sums.T
    beta[:, r[jj], r[ii]] = sums.T
    # the checks gram_matrix makes per key, for the whole batch in one host sync
    flags = batch_flags(beta, full)
    if has_base and not full:  # the base cancels in the differences: look at it directly
        flags |= key_sums(~torch.isfinite(b[n])) > 0
    return map_pivoted(beta, full).unbind(0), flags.tolist()


def _padded(numel: int) -> int:
    return -(-numel // SUB_BLOCK) * SUB_BLOCK


def _medium_capacity(xs, base) -> int:
    return gram_chunk(xs[0].device, len(xs) + (base is not None))


def _is_medium(xs, base) -> bool:
    """A key for a medium batch: CPU, 2+ inputs of the batchable dtypes, above SMALL_KEY and within
    one chunk, and not one the fused kernels take."""
    x0 = xs[0]
    numel = x0.numel()
    return (x0.device.type == "cpu" and len(xs) > 1 and SMALL_KEY < numel
            and _padded(numel) <= _medium_capacity(xs, base)
            and all(x.dtype in _BATCHABLE for x in xs) and (base is None or base.dtype in _BATCHABLE)
            and not fused.applicable(xs, numel))


def _medium_kind(xs, base, full: bool) -> tuple[bool, bool]:
    """Keys of one medium batch share it: (differences straight from fp32 inputs, a base given).
    The centred kind never reads the base's values into the rows (it cancels)."""
    direct = all(x.dtype == torch.float32 for x in xs) and (base is None or not full or base.dtype == torch.float32)
    return direct, base is not None


def _sub_block_products(b: torch.Tensor, n: int, full: bool, has_base: bool, subtract: bool = True) -> torch.Tensor:
    """(S, R*R) fp32 products of every sub-block of the rows b (n inputs, then the base row): of
    b_1..b_{n-1}, and b_0 too for full; subtract: form the pivot differences in b first."""
    if subtract:
        b[1:n].sub_(b[0])
        if full and has_base:
            b[0].sub_(b[n])
    first = 0 if full else 1
    r = n - first
    s = b.shape[1] // SUB_BLOCK
    v = b[first:n].view(r, s, SUB_BLOCK).transpose(0, 1)
    return torch.bmm(v, v.transpose(1, 2)).reshape(s, r * r)


def _medium_batch_products(groups, bases, full: bool):
    """Pivoted fp64 Grams (K, N, N) of K medium keys (module docstring), and (K,) 'base not
    finite' for the centred kind with a base (else None). Rows as gram_matrix's: b_0 = p_1 (only
    for full), b_i = x_{i+1} - x_1; each key from a sub-block boundary, zero-padded to the next."""
    n, k = len(groups[0]), len(groups)
    direct, has_base = _medium_kind(groups[0], bases[0], full)
    lengths = [xs[0].numel() for xs in groups]
    sizes = [_padded(m) for m in lengths]
    total = sum(sizes)
    b = scratch("gram", (n + has_base, total), torch.float32, "cpu")
    off = 0
    for xs, base, m, size in zip(groups, bases, lengths, sizes):
        flat = [x.reshape(-1) for x in xs]
        seg = slice(off, off + m)
        if direct:  # the differences straight from the inputs: no copies
            for i in range(1, n):
                torch.sub(flat[i], flat[0], out=b[i, seg])
            if full:
                if base is None:
                    b[0, seg].copy_(flat[0])
                else:
                    torch.sub(flat[0], base.reshape(-1), out=b[0, seg])
        else:  # converted here; the differences below, once for the batch
            for i in range(n):
                b[i, seg].copy_(flat[i])
            if full and has_base:
                b[n, seg].copy_(base.reshape(-1))
        if size > m:
            b[:, off + m: off + size].zero_()
        off += size
    parts = _sub_block_products(b, n, full, has_base, subtract=not direct)
    first = 0 if full else 1
    r = n - first
    starts = np.cumsum([0] + [size // SUB_BLOCK for size in sizes[:-1]])
    with np.errstate(invalid="ignore", over="ignore"):  # a key's Inf - Inf: its own NaN, flagged later
        sums = torch.from_numpy(np.add.reduceat(parts.numpy(), starts, axis=0, dtype=np.float64)).view(k, r, r)
    beta = torch.zeros(k, n, n, dtype=torch.float64)
    beta[:, first:, first:] = (sums + sums.transpose(1, 2)) / 2
    base_bad = None
    if has_base and not full:  # the base cancels in the differences: look at it
        base_bad = torch.stack([~torch.isfinite(base).all() for base in bases])
    return beta, base_bad


def batch_flags(beta: torch.Tensor, full: bool) -> torch.Tensor:
    """(K,) bool: the keys whose pivoted Grams (K, N, N) gram_matrix's check would act on
    (non-finite, largest diagonal below TINY_GRAM, and for norms a point near 0)."""
    d = beta.diagonal(dim1=1, dim2=2)
    flags = ~torch.isfinite(beta).flatten(1).all(1)
    flags |= d.abs().amax(1) < TINY_GRAM
    if full:
        sq = torch.cat([d[:, :1], d[:, :1] + 2 * beta[:, 0, 1:] + d[:, 1:]], 1)
        top = sq.amax(1, keepdim=True)
        flags |= ((sq <= SHORT_POINT * top).any(1) & (top[:, 0] > 0))
    return flags


def _padded_batch_products(groups, bases, full: bool):
    """Pivoted fp64 Grams (K, N, N) of K small keys at once, and (K,) 'base not finite' for the
    centred kind with a base (else None), without a host sync. Each key starts at a multiple of
    SUB_BLOCK and is padded with zeros to the next one (zeros add nothing to a product), so one
    bmm forms every sub-block's products and a 0/1 matrix sums each key's sub-blocks in fp64."""
    n, k = len(groups[0]), len(groups)
    dev = groups[0][0].device
    has_base = bases[0] is not None
    lengths = [xs[0].numel() for xs in groups]
    blocks = [-(-m // SUB_BLOCK) for m in lengths]
    total = sum(blocks) * SUB_BLOCK
    rows = n + (1 if has_base else 0)
    b = torch.empty(rows, total, dtype=torch.float32, device=dev)
    pads = {}

    def padded(tensors):
        out = []
        for t, m, nb in zip(tensors, lengths, blocks):
            out.append(t.reshape(-1))
            if nb * SUB_BLOCK > m:
                z = pads.get(t.dtype)
                if z is None:
                    z = pads[t.dtype] = torch.zeros(SUB_BLOCK, dtype=t.dtype, device=dev)
                out.append(z[: nb * SUB_BLOCK - m])
        return out

    def gather(tensors, row):
        parts = padded(tensors)
        dtype = parts[0].dtype
        if dtype == row.dtype or any(t.dtype != dtype for t in parts):
            torch.cat(parts, out=row)
        else:  # a cat that also converts copies tensor by tensor on CUDA: cat first, convert once
            row.copy_(torch.cat(parts))

    for i in range(n):
        gather([xs[i] for xs in groups], b[i])
    if has_base:
        gather(bases, b[n])
    parts = _sub_block_products(b, n, full, has_base).to(torch.float64)
    first = 0 if full else 1
    r = n - first
    s = total // SUB_BLOCK
    # which key owns each sub-block; non_blocking: a small pageable copy that does not wait for the GPU
    owner = torch.repeat_interleave(torch.arange(k), torch.tensor(blocks)).to(dev, non_blocking=True)
    select = (owner[None, :] == torch.arange(k, device=dev)[:, None]).to(torch.float64)  # (K, S) 0/1
    # 0 * Inf is NaN: a key's non-finite products must not reach the other keys' sums
    finite = torch.isfinite(parts)
    sums = (select @ torch.where(finite, parts, 0.0)).view(k, r, r)
    hit = (select @ (~finite).to(torch.float64)) > 0  # (K, R*R): where a key's own products were not
    sums = sums.masked_fill(hit.view(k, r, r), float("nan"))
    beta = torch.zeros(k, n, n, dtype=torch.float64, device=dev)
    beta[:, first:, first:] = (sums + sums.transpose(1, 2)) / 2
    base_bad = None
    if has_base and not full:
        nonfinite = (~torch.isfinite(b[n])).view(s, SUB_BLOCK).sum(1, dtype=torch.float64)
        base_bad = (select @ nonfinite) > 0
    return beta, base_bad

"""Sign-elected median ("TSD v2.1", GeometricMedian(A^p)): TIES sign election on task vectors,
then the geometric median of the sign-masked task vectors.

Math. τ_i = x_i - base. Optional DARE drop (Yu et al. 2024): each entry of each τ_i is kept with
probability q = 1 - p (to 2^-33, dare.py) and rescaled by 1/q. Sign election (TIES, Yadav et al.
2023): per entry γ = sgn(Σ_i w_i τ_i) (the sign with the larger weighted total mass), and γ = 0
(no entry kept) where |Σ_i w_i τ_i| <= TIE · Σ_i w_i |τ_i| (TIE = 2^-18): an exact tie elects
no sign, and fp32 rounding (~13·2^-24 relative for 12 inputs) must not break one. Exact ties
occur in fp16/bf16 task vectors (a few ulps each): weights 3,1,1 and τ = (1, -5, 2)·2^-7 sum to
0, which fp32 made 2^-32 (the weights 3/5 and 1/5 are not binary fractions). Before this rule
such ties were broken by rounding, in an order that differs between devices, and a bf16 merge
was off by up to 8% from the definition (random stress, 1-3 ties in 300 entries). Entries of τ_i
whose sign is not γ are zeroed, giving τ̃_i. Then the weighted geometric median of the τ̃_i
(Weiszfeld with the Vardi-Zhang step, see geometric_median.py) over the whole tensor, and the
result base + λ Σ c_i τ̃_i. The masks differ per element, so the result is a tensor, not a linear
combination of the inputs.
Two passes over the key: the Gram of the τ̃_i (fp64-accumulated, pivoted like gram.py), then the
combination; chunks are regenerated identically in the second pass (a mask depends on the entry,
not the chunk), so no N full-size fp32 copies are held; the elected signs are kept from the first
pass (int8, one byte per entry) instead of elected again, and so are the drop masks (one byte per
entry and input, up to KEPT_MASK_BYTES per key; the hash writes them there and both passes
multiply by them) instead of hashed again: the same bits, 3-5 inputs × 16.8M with drop 0.3 about
14% faster.
Randomness: the DARE masks come from a counter-based hash of (seed, key, input, entry) (dare.py;
the key enters via CRC32, so keys of one shape get different masks); no generator, global or
private. The masks are the same on CPU and CUDA and for any chunk size, so a merge with a drop
differs between devices only by rounding. (Before 2026-11-23 they came from a torch.Generator on
the compute device, whose stream differed between CPU and CUDA.)
Identical inputs with drop_rate 0 return the input (strength 1) bit-exactly.
With BARYCENTER_CPU_KERNELS=fused (fused.py) and 2-4 inputs and a base of one dtype (with a drop:
a key whose masks are kept), each pass over a key's whole sub-blocks is one compiled loop
(FUSED_BLOCKS below); the numbers are there.
The engine merges a model's keys through a SignElectedGroup: each key's election and Gram pass
as it is read, the Grams of consecutive keys (up to GROUP_ELEMS entries) solved in one batch on
the CPU, then each combined; on CPU each key's Gram pass and combine are items of up to
PART_ELEMS entries on the engine's worker threads (ops on one thread each: torch's threads,
waiting for each other at every op, made the node 5-7x slower on a busy machine). The same bits as one key at a time (SD1.5 shapes, 3 fp16 models,
one thread), whose 686 single-key solves cost 1.3–3.2 s of CPU time there (the benchmark: 24% of the merge); on a
GPU each ran its steps as kernel launches.
References: P. Yadav et al., "TIES-Merging", NeurIPS 2023; L. Yu et al., "Language models are
Super Mario" (DARE), ICML 2024; Vardi & Zhang, PNAS 2000.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Sequence

import torch

from . import fused
from . import geometric_median as gm
from .combine import same_tensors
from .dare import DropMask
from .element_median import WRITABLE
from .errors import MergeInputError
from .gram import (TINY_GRAM, block_products, chunk_products, compute_dtype, default_chunk, finish_products,
                   locate_nonfinite, map_pivoted, rescale_exponent, scale_pow2_, scratch)
from .inputs import check_params, check_weights
from .threads import PART_ELEMS, WorkerThreads, intra_op_threads

DEFAULTS = {"drop_rate": 0.0, "seed": 0, **gm.DEFAULTS}
TIE = 2.0 ** -18  # relative: above the fp32 election sum's rounding for up to 12 inputs (~13·2^-24)
DROP_CPU_CHUNK = 1 << 16  # with a drop, the hash's int32 rows of a chunk then stay in L2 (~15% faster)
KEPT_MASK_BYTES = 1 << 27  # drop masks up to this size (a byte per entry and input) are kept for the combine
GROUP_ELEMS = 1 << 24  # entries of the keys a SignElectedGroup solves together (a larger key: alone)


# Opt-in fused CPU loops (BARYCENTER_CPU_KERNELS=fused, fused.py) for 2..fused.MAX_INPUTS inputs
# and a base of one dtype (a drop's masks hashed eagerly into the kept masks, then read by both
# loops: the int32 hash relies on wrap-around, which compiled C++ does not promise); per call
# FUSED_BLOCKS sub-blocks of the key, the
# election, u_i, the centred products per sub-block and the kept counts in one compiled call
# (inductor makes it two loops: γ, then the rest over rows still in cache), and the combine in
# another, instead of ~35 eager ops over each chunk. The same arithmetic as _chunks (signs, u,
# products summed in fp32 per sub-block of fused.SUB_BLOCK, then in fp64 on one thread); results
# differ from the eager kernel's by rounding (summation order, fused multiply-adds) only, and do
# not depend on the thread count or FUSED_BLOCKS. A quarter of SD1.5's keys (327M entries), 3
# inputs + base, one thread, A/B of 2026-11-24: fp32 3.2-4.3 s -> 1.5-1.8 s, fp16 3.1-3.4 -> 1.0-1.5;
# drop 0.3, fp16: 5.4-5.7 -> 2.9-3.1 s.
FUSED_BLOCKS = 1024  # sub-blocks per call: 256-8192 took the same time (2^20 entries; ~0.1 ms a call)


def _task_vectors(b, xs, masks, scale):
    """τ_i of one chunk, with a drop its kept entries rescaled (masks: uint8 rows, scale: (1,))."""
    bf = b.float()
    if masks is None:
        return [x.float() - bf for x in xs]
    return [(x.float() - bf) * m.float() * scale[0] for x, m in zip(xs, masks)]


def _fused_rows(w, b, xs, masks=None, scale=None):
    """(u_i = max(τ_i γ, 0) for each input, γ) of one chunk, as _chunks computes them."""
    t = _task_vectors(b, xs, masks, scale)
    g = w[0] * t[0]
    mag = w[0] * t[0].abs()
    for i in range(1, len(t)):
        g = g + w[i] * t[i]
        mag = mag + w[i] * t[i].abs()
    gamma = torch.sign(g) * (g.abs() > mag * TIE).float()
    return [torch.clamp(ti * gamma, min=0) for ti in t], gamma


def _fused_elect(w, b, signs, xs, masks=None, scale=None):
    """-> (pair sums of the pivoted differences u_i - u_1 per sub-block (P, blocks), upper triangle
    row-major; kept counts per sub-block (N, blocks)); γ written into signs (int8)."""
    u, gamma = _fused_rows(w, b, xs, masks, scale)
    signs.copy_(gamma.to(torch.int8))
    d = [ui - u[0] for ui in u[1:]]
    sums = torch.stack([(d[r] * d[q]).sum(1) for r in range(len(d)) for q in range(r, len(d))])
    counts = torch.stack([(ui > 0).float().sum(1) for ui in u])
    return sums, counts


def _fused_combine(c, b, signs, out, xs, masks=None, scale=None):
    """out = base + γ Σ c_i u_i, computed in fp32 (γ from the Gram pass), rounded once."""
    t = _task_vectors(b, xs, masks, scale)
    gamma = signs.float()
    v = c[0] * torch.clamp(t[0] * gamma, min=0)
    for i in range(1, len(t)):
        v = v + c[i] * torch.clamp(t[i] * gamma, min=0)
    return out.copy_((b.float() + gamma * v).to(out.dtype))  # out itself: run_variant's None means failure


# one function per N and step (torch.compile's cache is per function: see fused.py)
def _elect2(w, b, signs, x1, x2):
    return _fused_elect(w, b, signs, [x1, x2])


def _elect3(w, b, signs, x1, x2, x3):
    return _fused_elect(w, b, signs, [x1, x2, x3])


def _elect4(w, b, signs, x1, x2, x3, x4):
    return _fused_elect(w, b, signs, [x1, x2, x3, x4])


def _combine2(c, b, signs, out, x1, x2):
    return _fused_combine(c, b, signs, out, [x1, x2])


def _combine3(c, b, signs, out, x1, x2, x3):
    return _fused_combine(c, b, signs, out, [x1, x2, x3])


def _combine4(c, b, signs, out, x1, x2, x3, x4):
    return _fused_combine(c, b, signs, out, [x1, x2, x3, x4])


# with a DARE drop: the keep masks (uint8 rows, hashed by dare.py) and 1/q come in too
def _elect_drop2(w, scale, b, signs, m1, m2, x1, x2):
    return _fused_elect(w, b, signs, [x1, x2], [m1, m2], scale)


def _elect_drop3(w, scale, b, signs, m1, m2, m3, x1, x2, x3):
    return _fused_elect(w, b, signs, [x1, x2, x3], [m1, m2, m3], scale)


def _elect_drop4(w, scale, b, signs, m1, m2, m3, m4, x1, x2, x3, x4):
    return _fused_elect(w, b, signs, [x1, x2, x3, x4], [m1, m2, m3, m4], scale)


def _combine_drop2(c, scale, b, signs, out, m1, m2, x1, x2):
    return _fused_combine(c, b, signs, out, [x1, x2], [m1, m2], scale)


def _combine_drop3(c, scale, b, signs, out, m1, m2, m3, x1, x2, x3):
    return _fused_combine(c, b, signs, out, [x1, x2, x3], [m1, m2, m3], scale)


def _combine_drop4(c, scale, b, signs, out, m1, m2, m3, m4, x1, x2, x3, x4):
    return _fused_combine(c, b, signs, out, [x1, x2, x3, x4], [m1, m2, m3, m4], scale)


_LOOPS = {("elect", False): (_elect2, _elect3, _elect4), ("combine", False): (_combine2, _combine3, _combine4),
          ("elect", True): (_elect_drop2, _elect_drop3, _elect_drop4),
          ("combine", True): (_combine_drop2, _combine_drop3, _combine_drop4)}
for (_step, _drop), _fns in _LOOPS.items():
    for _n, _fn in zip((2, 3, 4), _fns):  # variant: ("sign_elected", step, N, with a drop)
        fused.register(("sign_elected", _step, _n, _drop), _fn, f"sign-elected median kernel for {_n} inputs "
                       f"({'election and Gram' if _step == 'elect' else 'combine'}{', with a drop' if _drop else ''}")


def fused_entries(flat, fb, numel: int, masks_kept: bool = True) -> int:
    """Entries [0, m) of a key that the fused loops take (whole sub-blocks), 0 for none. With a
    drop only where its masks are kept between the passes (masks_kept; see KEPT_MASK_BYTES)."""
    if not masks_kept or len(flat) < 2 or not fused.applicable(list(flat) + [fb], numel, fused.MAX_INPUTS + 1):
        return 0
    return (numel // fused.SUB_BLOCK) * fused.SUB_BLOCK


def key_seed(seed: int, key: str) -> int:
    """Deterministic per-key seed from the user's seed and the key name."""
    return (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(key.encode("utf-8"))) % (1 << 63)


def sign_elected_median(xs: Sequence[torch.Tensor], base: torch.Tensor, weights=None, *,
                        strength: float = 1.0, drop_rate: float = 0.0, seed: int = 0, key: str = "",
                        tol: float = gm.DEFAULTS["tol"], max_iter: int = gm.DEFAULTS["max_iter"],
                        eps: float = gm.DEFAULTS["eps"], chunk_elems: int | None = None,
                        out_dtype: torch.dtype | None = None):
    """-> (result tensor on xs[0].device, record dict of plain values). The result is computed in
    fp32 (fp64 for fp64 inputs) and returned in out_dtype (default that compute dtype), rounded
    once as it is written. One key: a SignElectedGroup of one."""
    group = SignElectedGroup(len(xs), weights, strength=strength, drop_rate=drop_rate, seed=seed, tol=tol,
                             max_iter=max_iter, eps=eps, chunk_elems=chunk_elems, budget=0)
    group.add(xs, base, key=key, out_dtype=out_dtype)
    return group.finish()[0][1:]


class SignElectedGroup:
    """Keys of one merge, added one after another (each: the sign election and the Gram pass),
    then finished together: their Grams solved in one batch on the CPU (a solve is hundreds of
    tiny steps, as many for K keys as for one: see the module docstring), then each key combined. While pending a
    key holds its inputs, its elected signs (one byte per entry, in a shared buffer: one group at
    a time per thread) and its drop masks (n bytes per entry, in a buffer of the group, reused
    for the next keys instead of a fresh allocation per key). The pending keys hold at most
    `budget` entries, or one key that is larger."""

    def __init__(self, n: int, weights=None, *, strength: float = 1.0, drop_rate: float = 0.0, seed: int = 0,
                 tol: float = gm.DEFAULTS["tol"], max_iter: int = gm.DEFAULTS["max_iter"],
                 eps: float = gm.DEFAULTS["eps"], chunk_elems: int | None = None, budget: int = GROUP_ELEMS,
                 workers: WorkerThreads | None = None, part_elems: int | None = None):
        if n == 0:
            raise MergeInputError("sign_elected_median: no input tensors")
        p = float(drop_rate)
        if not (0.0 <= p < 1.0):
            raise MergeInputError(f"drop_rate must be in [0, 1); got {drop_rate}")
        try:
            ok = not isinstance(seed, bool) and float(seed) == int(seed)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise MergeInputError(f"seed must be a whole number; got {seed!r}")
        self.prm = check_params("sign_elected_median", {"tol": tol, "max_iter": max_iter, "eps": eps})
        self.lam = float(strength)
        if not math.isfinite(self.lam):
            raise MergeInputError(f"strength must be finite; got {strength}")
        self.n, self.p, self.seed = n, p, int(seed)
        self.w = check_weights(weights if weights is not None else torch.ones(n), n)
        self.chunk_elems, self.budget, self.part_elems = chunk_elems, int(budget), int(part_elems or PART_ELEMS)
        self.pending: list[_Key] = []
        self.used = 0       # entries of the pending keys (their signs' offset in the buffer)
        self.capacity = 0   # entries the signs buffer holds for this batch of keys
        self.drop_masks = None  # (n * entries,) uint8: the pending keys' drop masks
        # each key's Gram pass and combine as items of up to part_elems entries (whole chunks) on
        # these threads (the caller sets one intra-op thread); None: in the caller, as they come
        self.pool = workers

    def add(self, xs: Sequence[torch.Tensor], base: torch.Tensor, *, key: str = "",
            out_dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor, dict]]:
        """Take a key: its sign election and Gram pass now (with workers: queued on them). -> the
        pending keys finished to make room for it (see finish), usually none."""
        if base is None:
            raise MergeInputError("sign_elected_median needs a base model (it elects signs of x_i - base)")
        if len(xs) != self.n:
            raise MergeInputError(f"sign_elected_median: {len(xs)} input tensors, the group has {self.n}")
        numel = xs[0].numel()
        done = self.finish() if self.pending and self.used + numel > self.budget else []
        dev = xs[0].device
        if not self.pending:
            self.capacity = max(self.budget, numel)
        start, self.used = self.used, self.used + numel
        signs = scratch("sign_elected.signs", (self.capacity,), torch.int8, dev)[start: start + numel]
        kept_masks = None
        if self.p > 0 and self.n * numel <= KEPT_MASK_BYTES:
            size = self.n * self.capacity
            if self.drop_masks is None or self.drop_masks.numel() < size or self.drop_masks.device != dev:  # only at a first key
                self.drop_masks = torch.empty(size, dtype=torch.uint8, device=dev)
            kept_masks = self.drop_masks[self.n * start: self.n * (start + numel)].view(self.n, numel)
        k = _Key(self, xs, base, key, out_dtype, signs, kept_masks)
        if k.result is None:  # not a key of identical inputs (done when made)
            k.items = [self._run(fn) for fn in k.gram_items()]
        self.pending.append(k)
        return done

    def _run(self, fn):
        if self.pool is None:
            fn()
            return None
        return self.pool.submit(lambda _: fn(), None)

    def _wait(self, item) -> None:
        if item is not None:
            self.pool.wait_for(item)
            item.result()  # its error; waited for in key order, the first bad key's is raised

    def finish(self) -> list[tuple[str, torch.Tensor, dict]]:
        """(key, result, record) of every pending key, in the order added; the group is then empty."""
        keys, self.pending, self.used = self.pending, [], 0
        for k in keys:
            for item in k.items:
                self._wait(item)
            if k.result is None:
                k.finish_gram()
        solved = [k for k in keys if k.gram is not None]
        if solved:
            sol = gm.solve_geometric_median(torch.stack([k.gram for k in solved]), self.w, **self.prm)
            coeffs = sol.coeffs.tolist()
            rec = {f: sol.record[f].tolist() for f in ("iterations", "converged", "objective")}
            for i, k in enumerate(solved):
                k.items = [self._run(fn) for fn in k.combine_items(coeffs[i], {f: v[i] for f, v in rec.items()})]
            for k in solved:
                for item in k.items:
                    self._wait(item)
                k.finish_combine()
        return [(k.key, *k.result) for k in keys]


class _Key:
    """One key of a SignElectedGroup: the Gram pass (gram_items, then finish_gram: gram is (N+1,
    N+1) fp64 on the CPU), the combine when its coefficients are known (combine_items, then
    finish_combine: result). Its chunks are regenerated identically in both. Each pass is a list of
    items over ranges of whole chunks (up to the group's part_elems entries), run in any order on
    any thread: every chunk's products and kept counts go to rows of their own, summed in chunk
    order after, so the bits do not depend on the split or the threads."""

    def __init__(self, group: SignElectedGroup, xs, base, key, out_dtype, signs, kept_masks):
        n, w = group.n, group.w
        self.key, self.lam, self.out_dtype = key, group.lam, out_dtype
        self.gram = self.result = None
        self.items = []  # the pass's WorkItems (None: ran in the caller)
        dev = xs[0].device
        cdt = self.cdt = compute_dtype(*xs, base)
        if group.p == 0.0 and same_tensors(list(xs)):
            locate_nonfinite(xs, base, key or "tensor")  # no Gram here to show a NaN
            x = xs[0].to(dtype=cdt, copy=True)
            out = x if self.lam == 1.0 else base.to(cdt) + self.lam * (x - base.to(cdt))
            self.result = (out.to(out_dtype or cdt), {"coefficients": w.tolist(), "identical": True,
                                                      "iterations": 0, "converged": True})
            return
        self.xs, self.base = xs, base  # held until the combine (a key of identical inputs is done above)
        numel = self.numel = xs[0].numel()
        chunk_elems = group.chunk_elems
        if not chunk_elems and group.p > 0 and dev.type == "cpu":
            chunk_elems = DROP_CPU_CHUNK
        self.chunk = max(1, min(int(chunk_elems or default_chunk(dev)), max(numel, 1)))
        self.flat = [x.reshape(-1) for x in xs]
        self.fb = base.reshape(-1)
        self.direct = all(x.dtype == cdt for x in self.flat) and self.fb.dtype == cdt
        self.wd = w.to(device=dev, dtype=cdt)
        self.drop = DropMask(group.p, key_seed(group.seed, key), n, numel, dev) if group.p > 0 else None
        self.signs = signs  # γ of the Gram pass, for the combine
        # the Gram pass's drop masks, for the combine: one byte per entry and input instead of
        # hashing again (the hash is ~14 int32 ops per entry and input); very large keys hash twice
        self.kept_masks = kept_masks
        self.kept_count = torch.zeros(n, dtype=torch.float64, device=dev)  # the fused loops' (+ the parts' at the end)
        self.part = max(1, group.part_elems // self.chunk) * self.chunk
        self.parts = self.counts = self.fused_beta = self.out = self.rec = None
        # entries [0, fused_m) go through the fused loops (fused_entries), the rest through _chunks
        self.fused_m = fused_entries(self.flat, self.fb, numel, self.drop is None or kept_masks is not None)

    def _fused_calls(self, step: str, param, outs):
        """The compiled loop of `step` ("elect" or "combine") over the entries [0, fused_m),
        FUSED_BLOCKS sub-blocks a call, writing into the flat tensors outs: (start, end, its result)
        each; None from the first when compiling failed. With a drop the keep masks come in
        (hashed first by the elect step, into the kept masks the combine reads)."""
        blocks, n = self.fused_m // fused.SUB_BLOCK, len(self.flat)
        size = FUSED_BLOCKS * fused.SUB_BLOCK
        drop, params, masks = self.drop, [param], []
        if drop is not None:
            params.append(torch.tensor([drop.scale], dtype=torch.float32))
            masks = list(self.kept_masks)  # a row per input
        for a in range(0, self.fused_m, size):
            e = min(self.fused_m, a + size)
            if drop is not None and step == "elect":  # in pieces whose int32 hash rows stay in cache
                for h in range(a, e, DROP_CPU_CHUNK):
                    he = min(e, h + DROP_CPU_CHUNK)
                    drop.keep(h, he, self.kept_masks[:, h:he])
            rows = min(FUSED_BLOCKS, blocks - a // fused.SUB_BLOCK)
            views = [x[a:e].view(rows, fused.SUB_BLOCK) for x in [self.fb, *outs, *masks, *self.flat]]
            yield a, e, fused.run_variant(("sign_elected", step, n, drop is not None), [*params, *views])

    def _fused_gram(self) -> torch.Tensor | None:
        """The fused loops' part of the pivoted Gram (N, N), fp64 (row and column 0 zero), their
        signs stored and kept counts added; None when compiling failed."""
        n = len(self.flat)
        sums, counts = [], []
        for _, _, got in self._fused_calls("elect", self.wd, [self.signs]):
            if got is None:
                return None
            sums.append(got[0])
            counts.append(got[1])
        with intra_op_threads(1):  # one summation order whatever the threads
            self.kept_count += torch.cat(counts, 1).double().sum(1)
            return fused.beta_from_sums(torch.cat(sums, 1).double().sum(1), n, full=False)

    def _ranges(self, start: int) -> list[tuple[int, int]]:
        """[a, e) from start to the end in whole chunks, up to self.part entries each: one item each."""
        return [(a, min(self.numel, a + self.part)) for a in range(start, self.numel, self.part)]

    def _chunks(self, elect: bool, start: int, end: int, counts: torch.Tensor | None = None):
        """(a, e, u, base chunk, γ) per chunk of [start, end); elect: γ elected (and stored), the
        kept counts added to counts, else γ read back."""
        n, chunk, cdt, dev = len(self.flat), self.chunk, self.cdt, self.flat[0].device
        flat, fb, drop, signs, kept_masks = self.flat, self.fb, self.drop, self.signs, self.kept_masks
        buf = scratch("sign_elected", (n + 1, chunk), cdt, dev)
        elected = scratch("sign_elected.elected", (chunk,), cdt, dev)
        magnitude = scratch("sign_elected.magnitude", (chunk,), cdt, dev)
        tie_row = scratch("sign_elected.tie", (chunk,), cdt, dev)
        positive = scratch("sign_elected.positive", (n, chunk), cdt, dev)
        # the hash's rows when it runs in both passes (the kept masks take them otherwise)
        mask = scratch("sign_elected.mask", (n, chunk), cdt, dev) if drop is not None and kept_masks is None else None
        # counts of ones summed in fp32 are exact up to 2^24 (and 2.3x faster than converting to fp64)
        count_dtype = None if chunk <= 1 << 24 else torch.float64
        for a in range(start, end, chunk):
            e = min(end, a + chunk)
            t = buf[:n, : e - a]
            if self.direct:  # inputs in the compute dtype: differences straight from them
                bb = fb[a:e]
                for i in range(n):
                    torch.sub(flat[i][a:e], bb, out=t[i])
            else:
                bb = buf[n, : e - a].copy_(fb[a:e])
                for i in range(n):
                    t[i].copy_(flat[i][a:e])
                t.sub_(bb)
            if drop is not None:
                m = mask[:, : e - a] if kept_masks is None else kept_masks[:, a:e]
                if elect or kept_masks is None:
                    drop.keep(a, e, m)
                t.mul_(m).mul_(drop.scale)
            g = elected[: e - a]
            if elect:
                torch.mm(self.wd[None], t, out=g[None])
                # a near tie (|Σ wτ| within TIE of Σ w|τ|: rounding's reach) elects no sign, as
                # an exact one does; exact ties are common where fp16/bf16 task vectors are a few
                # ulps, and the rounding that broke them differed between devices
                mag = magnitude[: e - a]
                torch.mm(self.wd[None], torch.abs(t, out=positive[:, : e - a]), out=mag[None])
                torch.gt(torch.abs(g, out=tie_row[: e - a]), mag.mul_(TIE), out=mag)
                signs[a:e].copy_(g.sign_().mul_(mag))
            else:
                g.copy_(signs[a:e])
            # u = max(τγ, 0) is |τ| where sgn τ = γ and 0 elsewhere (γ = 0 keeps nothing), and
            # τ̃ = γu. Both passes work on u: γ = ±1 wherever u != 0, so the Gram of u (and of its
            # pivoted differences) is that of τ̃, and Σ c_i τ̃_i = γ Σ c_i u_i, exactly (a sign
            # flip commutes with rounding). Float ops: bool masks are ~5x slower on CPU.
            t.mul_(g).clamp_(min=0)
            if elect:
                counts.add_(torch.gt(t, 0, out=positive[:, : e - a]).sum(1, dtype=count_dtype))
            yield a, e, t, bb, g

    def gram_items(self) -> list:
        """The Gram pass as callables (see the class): the fused loops and the eager rest as one
        (the compiled loops use the host's threads), else one per range of chunks."""
        if self.fused_m:
            return [self._fused_and_eager_gram]
        return self._eager_gram_items(0)

    def _eager_gram_items(self, start: int, exp2: int = 0) -> list:
        """Products (per chunk) and kept counts (per range) of the entries [start, numel) eagerly,
        into fresh rows; exp2: rows scaled by 2^-exp2 (the rare rescaled recompute)."""
        n = len(self.flat)
        r = n - 1 + (n == 1)  # the centred block's rows (one input: the pivot row alone)
        ranges = self._ranges(start)
        self.parts = torch.zeros(max(1, -(-(self.numel - start) // self.chunk)), r, r, dtype=self.cdt,
                                 device=self.flat[0].device)
        self.counts = torch.zeros(max(1, len(ranges)), n, dtype=torch.float64, device=self.flat[0].device)
        return [functools.partial(self._gram_range, i, a, e, (a - start) // self.chunk, exp2)
                for i, (a, e) in enumerate(ranges)]

    def _fused_and_eager_gram(self) -> None:
        self.fused_beta = self._fused_gram()
        if self.fused_beta is None:  # compiling failed (fused.py warned): all eager
            self.fused_m = 0
        for fn in self._eager_gram_items(self.fused_m):
            fn()

    def _gram_range(self, i: int, a: int, e: int, j0: int, exp2: int) -> None:
        # the geometric median needs only the centred block (products of the differences): no
        # pivot row, as gram_matrix(full=False); one input keeps it (its only NaN check)
        full = len(self.flat) == 1
        for j, (_, _, t, _, _) in enumerate(self._chunks(True, a, e, self.counts[i]), j0):
            if exp2:  # rows scaled by 2^-exp2 (exact), the products by 4^exp2 in fp64
                scale_pow2_(t, exp2)
            if full:
                chunk_products(t, self.parts[j])
            else:
                t[1:].sub_(t[0])
                block_products(t[1:], self.parts[j])

    def _beta(self, exp2: int = 0) -> torch.Tensor:
        n = len(self.flat)
        if n == 1:
            beta = finish_products(self.parts)
        else:
            beta = torch.zeros(n, n, dtype=torch.float64, device=self.flat[0].device)
            beta[1:, 1:] = finish_products(self.parts)
        if self.fused_beta is not None:
            beta += self.fused_beta
        return scale_pow2_(beta, -2 * exp2) if exp2 else beta

    def finish_gram(self) -> None:
        """The Gram from the items' rows (they have all run), checked: a NaN or Inf named, fp32
        products that overflowed or may have underflowed recomputed rescaled (see gram.py)."""
        xs, base, key = self.xs, self.base, self.key
        beta = self._beta()
        bad, tiny = torch.stack([~torch.isfinite(beta).all(), beta.diagonal().abs().max() < TINY_GRAM]).tolist()
        if bad:
            locate_nonfinite(xs, base, key or "tensor")
        if bad or tiny:
            e = rescale_exponent(list(xs) + [base], force=bad)
            if e:  # eager throughout, in the caller
                self.kept_count.zero_()
                self.fused_m, self.fused_beta = 0, None
                for fn in self._eager_gram_items(0, e):
                    fn()
                beta = self._beta(e)
                bad = not bool(torch.isfinite(beta).all())
        if bad:
            raise MergeInputError(f"key '{key or 'tensor'}': the inputs overflow the compute precision")
        self.kept_count += self.counts.sum(0)  # whole counts: exact in any order
        self.gram = map_pivoted(beta, len(self.flat) == 1).cpu()
        self.parts = self.counts = None

    def combine_items(self, c: list[float], rec: dict) -> list:
        """The combine base + γ Σ c_i u_i as callables (see the class) writing into one output."""
        dev = self.flat[0].device
        cc = (self.lam * torch.tensor(c, dtype=torch.float64)).to(device=dev, dtype=self.cdt)
        odt = self.out_dtype or self.cdt
        self.out = torch.empty(self.xs[0].shape, dtype=odt if odt in WRITABLE else self.cdt, device=dev)
        self.rec = {"coefficients": c, "iterations": int(rec["iterations"]), "converged": bool(rec["converged"]),
                    "objective": float(rec["objective"])}
        if self.fused_m:
            return [functools.partial(self._fused_and_eager_combine, cc)]
        return [functools.partial(self._combine_range, cc, a, e) for a, e in self._ranges(0)]

    def _fused_and_eager_combine(self, cc: torch.Tensor) -> None:
        start = 0  # the fused loop's part; the rest (or all, if it failed to compile) eager, from the same signs
        for _, e, got in self._fused_calls("combine", cc, [self.signs, self.out.view(-1)]):
            if got is None:
                break
            start = e
        self._combine_range(cc, start, self.numel)

    def _combine_range(self, cc: torch.Tensor, a: int, e: int) -> None:
        fo = self.out.view(-1)
        for ca, ce, u, bb, g in self._chunks(False, a, e):
            torch.addcmul(bb, g, cc @ u, out=fo[ca:ce])  # in cdt (γ·v exact), rounded to the output's dtype once

    def finish_combine(self) -> None:
        out, self.out = self.out, None
        self.result = (out.to(self.out_dtype or self.cdt), {
            **self.rec,
            "kept_fraction": (self.kept_count / max(self.numel, 1)).tolist(),
            "identical": False,
        })

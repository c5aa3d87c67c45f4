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
References: P. Yadav et al., "TIES-Merging", NeurIPS 2023; L. Yu et al., "Language models are
Super Mario" (DARE), ICML 2024; Vardi & Zhang, PNAS 2000.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

from . import geometric_median as gm
from .combine import same_tensors
from .dare import DropMask
from .element_median import WRITABLE
from .errors import MergeInputError
from .gram import (TINY_GRAM, chunk_products, compute_dtype, default_chunk, finish_products, locate_nonfinite,
                   pivot_map, rescale_exponent, scale_pow2_, scratch)
from .inputs import check_params, check_weights

DEFAULTS = {"drop_rate": 0.0, "seed": 0, **gm.DEFAULTS}
TIE = 2.0 ** -18  # relative: above the fp32 election sum's rounding for up to 12 inputs (~13·2^-24)
DROP_CPU_CHUNK = 1 << 16  # with a drop, the hash's int32 rows of a chunk then stay in L2 (~15% faster)
KEPT_MASK_BYTES = 1 << 27  # drop masks up to this size (a byte per entry and input) are kept for the combine


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
    once as it is written."""
    if base is None:
        raise MergeInputError("sign_elected_median needs a base model (it elects signs of x_i - base)")
    n = len(xs)
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
    prm = check_params("sign_elected_median", {"tol": tol, "max_iter": max_iter, "eps": eps})
    lam = float(strength)
    if not math.isfinite(lam):
        raise MergeInputError(f"strength must be finite; got {strength}")
    w = check_weights(weights if weights is not None else torch.ones(n), n)
    dev = xs[0].device
    cdt = compute_dtype(*xs, base)
    if p == 0.0 and same_tensors(list(xs)):
        locate_nonfinite(xs, base, key or "tensor")  # no Gram here to show a NaN
        x = xs[0].to(dtype=cdt, copy=True)
        out = x if lam == 1.0 else base.to(cdt) + lam * (x - base.to(cdt))
        return out.to(out_dtype or cdt), {"coefficients": w.tolist(), "identical": True, "iterations": 0,
                                          "converged": True}

    numel = xs[0].numel()
    if not chunk_elems and p > 0 and dev.type == "cpu":
        chunk_elems = DROP_CPU_CHUNK
    chunk = max(1, min(int(chunk_elems or default_chunk(dev)), max(numel, 1)))
    flat = [x.reshape(-1) for x in xs]
    fb = base.reshape(-1)
    direct = all(x.dtype == cdt for x in flat) and fb.dtype == cdt
    buf = scratch("sign_elected", (n + 1, chunk), cdt, dev)
    wd = w.to(device=dev, dtype=cdt)
    drop = DropMask(p, key_seed(int(seed), key), n, numel, dev) if p > 0 else None
    kept = torch.zeros(n, dtype=torch.float64, device=dev)

    elected = scratch("sign_elected.elected", (chunk,), cdt, dev)
    magnitude = scratch("sign_elected.magnitude", (chunk,), cdt, dev)
    tie_row = scratch("sign_elected.tie", (chunk,), cdt, dev)
    positive = scratch("sign_elected.positive", (n, chunk), cdt, dev)
    # counts of ones summed in fp32 are exact up to 2^24 (and 2.3x faster than converting to fp64)
    count_dtype = None if chunk <= 1 << 24 else torch.float64

    signs = scratch("sign_elected.signs", (numel,), torch.int8, dev)  # γ of the Gram pass, for the combine
    # the Gram pass's drop masks, for the combine: one byte per entry and input instead of hashing
    # again (the hash is ~14 int32 ops per entry and input); very large keys hash twice instead
    # (a buffer of this call, not a scratch: it would stay allocated in the thread after the merge)
    kept_masks = (torch.empty(n, numel, dtype=torch.uint8, device=dev)
                  if drop is not None and n * numel <= KEPT_MASK_BYTES else None)
    # the hash's rows when it runs in both passes (the kept masks take them otherwise)
    mask = scratch("sign_elected.mask", (n, chunk), cdt, dev) if drop is not None and kept_masks is None else None

    def chunks(elect: bool):
        for a in range(0, numel, chunk):
            e = min(numel, a + chunk)
            t = buf[:n, : e - a]
            if direct:  # inputs in the compute dtype: differences straight from them
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
                torch.mm(wd[None], t, out=g[None])
                # a near tie (|Σ wτ| within TIE of Σ w|τ|: rounding's reach) elects no sign, as
                # an exact one does; exact ties are common where fp16/bf16 task vectors are a few
                # ulps, and the rounding that broke them differed between devices
                mag = magnitude[: e - a]
                torch.mm(wd[None], torch.abs(t, out=positive[:, : e - a]), out=mag[None])
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
                kept.add_(torch.gt(t, 0, out=positive[:, : e - a]).sum(1, dtype=count_dtype))
            yield a, e, t, bb, g

    nchunks = max(1, -(-numel // chunk))
    parts = torch.zeros(nchunks, n, n, dtype=cdt, device=dev)

    def products(exp2: int = 0) -> torch.Tensor:
        if exp2:
            kept.zero_()
        for j, (a, e, t, _, _) in enumerate(chunks(elect=True)):
            if exp2:  # rows scaled by 2^-exp2 (exact), the products by 4^exp2 in fp64
                scale_pow2_(t, exp2)
            if n > 1:
                t[1:].sub_(t[0])
            chunk_products(t, parts[j])
        beta = finish_products(parts)
        return scale_pow2_(beta, -2 * exp2) if exp2 else beta

    beta = products()
    bad, tiny = torch.stack([~torch.isfinite(beta).all(), beta.diagonal().abs().max() < TINY_GRAM]).tolist()
    if bad:
        locate_nonfinite(xs, base, key or "tensor")
    if bad or tiny:  # fp32 products overflowed or may have underflowed: see gram.py
        e = rescale_exponent(list(xs) + [base], force=bad)
        if e:
            beta = products(e)
            bad = not bool(torch.isfinite(beta).all())
    if bad:
        raise MergeInputError(f"key '{key or 'tensor'}': the inputs overflow the compute precision")
    tm = pivot_map(n, device=dev)
    gram = tm @ beta @ tm.T
    sol = gm.solve_geometric_median(gram[None], w, **prm)
    c = sol.coeffs[0]
    cc = (lam * c).to(device=dev, dtype=cdt)
    odt = out_dtype or cdt
    out = torch.empty(xs[0].shape, dtype=odt if odt in WRITABLE else cdt, device=dev)
    fo = out.view(-1)
    for a, e, u, bb, g in chunks(elect=False):
        torch.addcmul(bb, g, cc @ u, out=fo[a:e])  # in cdt (γ·v exact), rounded to the output's dtype once
    out = out.to(odt)
    rec = sol.record
    return out, {
        "coefficients": c.tolist(),
        "iterations": int(rec["iterations"][0]),
        "converged": bool(rec["converged"][0]),
        "objective": float(rec["objective"][0]),
        "kept_fraction": (kept / max(numel, 1)).tolist(),
        "identical": False,
    }

"""The one read of the data: an fp64 Gram matrix per key, from which every linear method solves.

Points p_i = x_i (or x_i - base in task-vector mode), i = 1..N. The kernel returns the augmented
(N+1)x(N+1) Gram of [m, d_1..d_N] with m = mean_i p_i and d_i = p_i - m. Inner products add up
over keys, so the Gram of a block or of the whole model (the concatenation of its keys) is the sum
of the keys' Grams.

How it is computed (precision, then speed):
- Per chunk the inputs are converted to the compute dtype (fp32; fp64 when an input is fp64) and
  pivoted on p_1: rows b_0 = p_1, b_i = x_{i+1} - x_1 (the base cancels in the differences);
  inputs already in the compute dtype are subtracted in place of being copied first.
  The Gram of the b rows is accumulated chunk by chunk in fp64 and mapped to [m, d] at the end by
  an exact-rational linear map (fp64). Differences are formed before any product, so distances
  keep fp32 relative accuracy however close the models are (an uncentred fp32 Gram loses
  ~(‖x‖/‖x_i - x_j‖)^2 of it). Identical inputs give b_i = 0 exactly, hence a d-block that is
  exactly zero (solvers use that to return the input bit-exactly).
- Products of the differences: one batched matmul per chunk over sub-blocks of 1024 elements
  (on CPU the lower triangle in bands of rows, mirrored: block_products)
  (fp32 accumulations stay short: a few 1e-7 relative error per sum, its rounding to fp32
  included, where one gemv/gemm over a 10^5-element chunk gives 1e-6..1e-5), summed per chunk,
  then over chunks in fp64. An entry of the [m, d] Gram adds up to four pivoted ones (‖m‖^2 for
  one): measured within ~1e-6 of the largest entry, the centred block within ~6e-7 of its largest
  diagonal (fp64 reference, 2026-11-23). The pivot row <b_0, b_i>
  (only needed for norms: Karcher) likewise; full=False skips it (geometric median, distances).
  Chunks of 2^18 elements on CPU, 2^19 for up to 4 rows (gram_chunk); on CUDA 2^24 (fewer
  launches). Peak extra memory: N+1 rows of one chunk in the compute dtype.
- Fused CPU kernels (opt-in, BARYCENTER_CPU_KERNELS=fused, fused.py): for 2-4 inputs of one
  dtype the same products come from one compiled loop per key (no fp32 copies, one read of each
  input); the remainder after the last whole sub-block and every other case use the chunks above.
- Norms ‖p_i‖^2 = ‖m‖^2 + 2<m,d_i> + ‖d_i‖^2 are accurate relative to ‖p_i‖^2 when the inputs
  have similar norms (always the case for fine-tunes); from fp32 products a point much closer to
  0 than the others gets an absolute error ~1e-7·max‖p‖^2, which can be all of its norm (a task
  vector 1000x shorter than the others: its direction is then noise). So where full Grams are
  asked for (Karcher) and some ‖p_i‖^2 <= 1e-3·max‖p‖^2 (SHORT_POINT: a task vector under ~3%
  of the longest), the per-key check recomputes the key's products in fp64 (one more read of that
  key, in fp64: rare, and the price of a direction that is not noise). Exact zeros (a task vector
  equal to 0 because the model equals the base) are detected and made exact, so Karcher can
  exclude them.
- NaN/Inf in an input shows up as a non-finite Gram; the input is then located and named.
- Extreme magnitudes: fp32 products of inputs near 1e30 overflow, of inputs below ~1e-19 (fp32
  subnormals included) underflow. The per-key host sync also flags a non-finite Gram from finite
  inputs and a Gram whose diagonal is below 2^-60; only then is the key read once more for its
  max |value| M and, when M lies outside [2^-40, 2^40], recomputed with every row scaled by the
  power of two that brings M into [0.5, 1) (exact), the result scaled back in fp64. The normal
  path does no extra work.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Sequence

import torch

from . import fused
from .errors import MergeInputError, model_name

CPU_CHUNK = 1 << 18
CPU_CHUNK_FEW_ROWS = 1 << 19  # the Gram pass's chunk for at most FEW_ROWS rows (gram_chunk)
FEW_ROWS = 4
CUDA_CHUNK = 1 << 24
SUB_BLOCK = 1024  # elements per product sub-block


def cpu_band(r: int) -> int:
    """Rows per batched matmul of block_products on CPU (measured; bands of 3 were slower): 4 rows
    at once, fewer as single rows, more in bands of 4."""
    return 4 if r >= 4 else 1


_tls = threading.local()


def scratch(name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A reusable uninitialised buffer. On CPU one per (thread, name, dtype), grown as needed:
    a fresh multi-MB allocation per key is a fresh mmap whose page faults cost about as much as
    the arithmetic. Elsewhere torch's caching allocator already reuses memory."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    t = bufs.get((name, dtype))
    if t is None or t.numel() < n:
        t = bufs[(name, dtype)] = torch.empty(max(n, 1), dtype=dtype)
    return t[:n].view(shape)


def fp32_matmul(fn):
    """Run fn with TF32 matmuls off: a host (or another pack) may have turned them on globally,
    and their 10-bit mantissas would put ~1e-3 relative error into the Gram's products."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        flags = torch.backends.cuda.matmul
        if not flags.allow_tf32:
            return fn(*args, **kwargs)
        flags.allow_tf32 = False
        try:
            return fn(*args, **kwargs)
        finally:
            flags.allow_tf32 = True
    return wrapped


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def default_chunk(device: torch.device) -> int:
    return CPU_CHUNK if torch.device(device).type == "cpu" else CUDA_CHUNK


def gram_chunk(device: torch.device, rows: int) -> int:
    """Elements per chunk of the Gram pass over `rows` buffer rows. On CPU 2^19 for up to FEW_ROWS
    rows (8 MiB in fp32): half the op calls per element. Measured with the engine's two pass
    threads at SD1.5 shapes: 2-4 inputs 6-18% faster than 2^18; 5 and 8 inputs the same, 2^20
    slower again (the rows leave the cache)."""
    if torch.device(device).type == "cpu" and rows <= FEW_ROWS:
        return CPU_CHUNK_FEW_ROWS
    return default_chunk(device)


def pivot_map(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(N+1, N) map T with [m, d_1..d_N] = T @ [b_0..b_{N-1}] (b_0 = p_1, b_i = p_{i+1} - p_1).
    Made once per (n, dtype, device) and shared by every key: read-only."""
    return _pivot_map(n, dtype, str(torch.device(device) if device is not None else "cpu"))


@functools.lru_cache(maxsize=64)
def _pivot_map(n: int, dtype, device: str) -> torch.Tensor:
    t = torch.zeros(n + 1, n, dtype=dtype, device=device)
    t[0, 0] = 1.0
    if n > 1:
        t[0, 1:] = 1.0 / n
        t[1:, 1:] = -1.0 / n
        t[2:, 1:] += torch.eye(n - 1, dtype=dtype, device=device)
    return t


@fp32_matmul
def gram_matrix(xs: Sequence[torch.Tensor], base: torch.Tensor | None = None, *,
                chunk_elems: int | None = None, key: str = "tensor", check: bool = True,
                full: bool = True) -> torch.Tensor:
    """Augmented (N+1)x(N+1) fp64 Gram of [m, d_1..d_N] for one key, on xs[0].device.

    xs: N tensors of one shape, any float dtype (fp64/32/16, bf16, fp8); base: optional, same
    shape (task-vector mode, points x_i - base). chunk_elems: elements per chunk (default 2^18
    on CPU, 2^24 on CUDA). check: one host sync per key to name the input holding NaN/Inf
    (MergeInputError) and to make exact-zero points exact; False skips both.
    full=False computes only the centred block G[1:, 1:] (all that the geometric median and the
    pairwise distances use; about 40% less work): G[0, 0] is then -1 and G[0, i] = G[i, 0] = 0,
    a marker that Karcher refuses. Sums over keys keep the marker as long as no full Gram is mixed in.
    """
    n = len(xs)
    if n == 0:
        raise MergeInputError(f"key '{key}': no input tensors")
    beta = pivoted_products(xs, base, full=full, chunk_elems=chunk_elems)

    def redo(exp2: int = 0, dtype=None):  # rows scaled by 2^-exp2, or in fp64 (half the elements: same bytes)
        chunk = chunk_elems or (gram_chunk(xs[0].device, len(xs) + (base is not None)) // 2 if dtype else None)
        return pivoted_products(xs, base, full=full, chunk_elems=chunk, exp2=exp2, dtype=dtype)

    if check and xs[0].numel():
        beta = _checked(beta, xs, base, key, norms=full, redo=redo)
    return map_pivoted(beta, full)


def pivoted_products(xs: Sequence[torch.Tensor], base: torch.Tensor | None = None, *, full: bool = True,
                     chunk_elems: int | None = None, exp2: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The pivoted fp64 Gram beta (N, N) of one key, on xs[0].device, before any check or map:
    the fused CPU kernel where it applies, else the chunked products (module docstring).
    dtype: compute in this dtype instead of compute_dtype's (fp64: the short-point recompute)."""
    n = len(xs)
    dev = xs[0].device
    numel = xs[0].numel()
    if numel == 0:
        return torch.zeros(n, n, dtype=torch.float64, device=dev)
    cdt = dtype or compute_dtype(*xs, base)
    chunk = max(1, min(int(chunk_elems or gram_chunk(dev, n + (base is not None))), numel))
    flat = [x.reshape(-1) for x in xs]
    fb = base.reshape(-1) if base is not None else None
    if exp2 == 0 and dtype is None and (fb is None or not full) and fused.applicable(flat, numel):
        done = fused.fused_products(flat, numel, full)
        if done is not None:
            beta, m = done
            if m < numel:
                beta += _pivot_products([x[m:] for x in flat], None, n, chunk, cdt, dev, full)
            return beta
    return _pivot_products(flat, fb, n, chunk, cdt, dev, full, exp2)


def map_pivoted(beta: torch.Tensor, full: bool) -> torch.Tensor:
    """Pivoted Grams (..., N, N) -> augmented Grams (..., N+1, N+1) of [m, d]. full=False keeps
    only the centred block and writes the marker (G[0, 0] = -1, G[0, i] = G[i, 0] = 0)."""
    t = pivot_map(beta.shape[-1], device=beta.device)
    g = t @ beta @ t.T
    # a full Gram keeps ‖m‖^2 as mapped, even slightly negative from rounding: clamping that entry
    # alone broke ‖p_i‖^2 = ‖m‖^2 + 2<m, d_i> + ‖d_i‖^2 (an exact-zero task vector got a norm, and a
    # Karcher merge of task vectors summing to ~0 came out ~0)
    if not full:
        g[..., 0, :] = 0.0
        g[..., :, 0] = 0.0
        g[..., 0, 0] = -1.0
    return g


def is_centred_only(grams: torch.Tensor) -> torch.Tensor:
    """(...,) bool: the Gram carries map_pivoted's full=False marker (no norms), also summed over keys."""
    return (grams[..., 0, 0] < 0) & (grams[..., 0, 1:] == 0).all(-1)


def _pivot_products(flat, fb, n: int, chunk: int, cdt, dev, full: bool, exp2: int = 0) -> torch.Tensor:
    """The pivoted fp64 Gram beta of [b_0 .. b_{N-1}] (see the module docstring). exp2 != 0: the
    rows are scaled by 2^-exp2 before any difference or product (exact) and beta by 4^exp2 after,
    in fp64 (the rare path for inputs whose fp32 products would overflow or underflow)."""
    numel = flat[0].numel()
    rows = n + (1 if fb is not None else 0)
    buf = scratch("gram", (rows, chunk), cdt, dev)
    nchunks = -(-numel // chunk)
    dd = torch.zeros(nchunks, n - 1, n - 1, dtype=cdt, device=dev)
    r0 = torch.zeros(nchunks, n, dtype=cdt, device=dev)
    # inputs already in the compute dtype: differences straight from them (no converted copies)
    direct = not exp2 and all(x.dtype == cdt for x in flat) and (fb is None or fb.dtype == cdt)
    for j in range(nchunks):
        a = j * chunk
        e = min(numel, a + chunk)
        b = buf[:, : e - a]
        if direct:
            x0 = flat[0][a:e]
            for i in range(1, n):
                torch.sub(flat[i][a:e], x0, out=b[i])
        else:
            for i in range(n):
                b[i].copy_(flat[i][a:e])
            if exp2:
                scale_pow2_(b[:n], exp2)
            if n > 1:
                b[1:n].sub_(b[0])
        if n > 1:
            block_products(b[1:n], dd[j])
        if full:
            b0 = b[0]
            if direct:
                if fb is None:
                    b0 = x0  # read where it is: no copy
                else:
                    torch.sub(x0, fb[a:e], out=b0)
            elif fb is not None:
                b[n].copy_(fb[a:e])
                if exp2:
                    scale_pow2_(b[n], exp2)
                b0.sub_(b[n])
            row_products(b0, b[1:n], r0[j])
    beta = torch.zeros(n, n, dtype=torch.float64, device=dev)
    if n > 1:
        beta[1:, 1:] = finish_products(dd)
    if full:
        row = r0.to(torch.float64).sum(0)
        beta[0, :] = row
        beta[:, 0] = row
    if exp2:
        scale_pow2_(beta, -2 * exp2)
    return beta


# Inputs whose largest |value| lies in [2^-40, 2^40] keep fp32 products far from overflow (even
# summed over a chunk) and their squares far above the subnormals; outside it (or when the
# products overflowed) a key is recomputed with its rows scaled by a power of two. Checked in the
# per-key host sync the kernel already makes, so the normal path does no extra work.
SAFE_EXP2 = 40
TINY_GRAM = 2.0 ** -60  # largest diagonal entry below this: fp32 products may have underflowed
# ‖p_i‖^2 <= SHORT_POINT·max‖p‖^2: a point whose fp32-product norm (error ~1e-7·max‖p‖^2) is off by
# more than ~1e-4 relative; with norms asked for, its key is recomputed in fp64 ("Norms" above)
SHORT_POINT = 1e-3


def scale_pow2_(t: torch.Tensor, exp2: int) -> torch.Tensor:
    """t *= 2^-exp2 in place, in factors of at most 2^64 (each scalar a normal fp32): exact
    while the results stay normal numbers."""
    left = -exp2
    while left:
        step = max(-64, min(64, left))
        t.mul_(2.0 ** step)
        left -= step
    return t


def max_abs(x: torch.Tensor, chunk: int = 1 << 22) -> float:
    """max |x| as a float (chunked, in the compute dtype: fp8 has no abs kernel on some builds)."""
    flat = x.reshape(-1)
    cdt = compute_dtype(x)
    m = 0.0
    for a in range(0, flat.numel(), chunk):
        m = max(m, float(flat[a:a + chunk].to(cdt).abs().max()))
    return m


def rescale_exponent(tensors, force: bool = False) -> int:
    """0 when the tensors' largest |value| M is 0 or within [2^-SAFE_EXP2, 2^SAFE_EXP2] (unless
    force), else e with M = m·2^e, m in [0.5, 1): scaling by 2^-e brings M into [0.5, 1)."""
    m = max(max_abs(t) for t in tensors if t is not None)
    if m == 0.0 or not math.isfinite(m):
        return 0
    e = math.frexp(m)[1]
    if not force and abs(e) <= SAFE_EXP2:
        return 0
    return e


def block_products(b: torch.Tensor, out: torch.Tensor) -> None:
    """b b^T for the rows of one chunk into out (R, R), compute dtype: one batched matmul over
    sub-blocks of SUB_BLOCK elements, summed. Short accumulations keep fp32 sums to a few 1e-7
    relative (one gemv or gemm over a 10^5-element chunk accumulates ~1e-6..1e-5 error).
    On CPU the batched matmul costs about its R·R entries (but 4 rows as little as 3), so there
    only the lower triangle is computed, in bands of cpu_band(R) rows, and mirrored: per 2^18-element
    chunk, one thread, R = 2: 68 instead of 80 us, R = 3: 132 vs 165, R = 7: 0.50 vs 0.68 ms,
    R = 11: 1.2 vs 1.9 ms. On a GPU one launch beats fewer products."""
    r, c = b.shape
    m = (c // SUB_BLOCK) * SUB_BLOCK
    if m:
        v = b[:, :m].view(r, m // SUB_BLOCK, SUB_BLOCK).transpose(0, 1)
        band = cpu_band(r) if b.device.type == "cpu" else r
        if band >= r:
            torch.sum(torch.bmm(v, v.transpose(1, 2)), 0, out=out)
        else:
            for a in range(0, r, band):
                e = min(r, a + band)
                torch.sum(torch.bmm(v[:, a:e], v[:, :e].transpose(1, 2)), 0, out=out[a:e, :e])
            out.copy_(out.tril() + out.tril(-1).mT)
    else:
        out.zero_()
    if m < c:
        t = b[:, m:]
        out.addmm_(t, t.T)


def row_products(b0: torch.Tensor, rest: torch.Tensor, out: torch.Tensor) -> None:
    """<b_0, b_0>, <b_0, b_1>, ... for one chunk into out (R,): b0 (c,), rest (R-1, c), sub-blocked
    like block_products. b0 is read where it is (an fp32 input needs no copy into the buffer:
    fp32 Karcher 2-3 inputs 7-8% faster, 5-6 inputs 3-5%); every path makes the same two batched
    matmuls, so a scaled recompute (exp2) gives the same bits times 4^exp2."""
    c = b0.shape[0]
    m = (c // SUB_BLOCK) * SUB_BLOCK
    if m:
        v0 = b0[:m].view(m // SUB_BLOCK, 1, SUB_BLOCK)
        torch.sum(torch.bmm(v0, v0.transpose(1, 2)), 0, out=out[:1].view(1, 1))
        if rest.shape[0]:
            v = rest[:, :m].view(rest.shape[0], m // SUB_BLOCK, SUB_BLOCK).transpose(0, 1)
            torch.sum(torch.bmm(v0, v.transpose(1, 2)), 0, out=out[1:].view(1, -1))
    else:
        out.zero_()
    if m < c:
        t = b0[m:]
        out[:1].add_(torch.dot(t, t))
        if rest.shape[0]:
            out[1:].addmv_(rest[:, m:], t)


def chunk_products(b: torch.Tensor, out: torch.Tensor) -> None:
    """All of b b^T (pivoted rows [b_0, b_1..]) into out (N, N)."""
    n = b.shape[0]
    if n > 1:
        block_products(b[1:], out[1:, 1:])
    row_products(b[0], b[1:], out[0])
    out[1:, 0] = out[0, 1:]


def finish_products(parts: torch.Tensor) -> torch.Tensor:
    """Sum per-chunk products (C, R, R) in fp64, symmetrised."""
    beta = parts.to(torch.float64).sum(0)
    return (beta + beta.transpose(-1, -2)) / 2


def _gram_flags(beta: torch.Tensor):
    """(non-finite, squared norms sq, any point near 0, largest diagonal below TINY_GRAM): one
    host sync (the (N, N) values as Python floats; checking them there costs less than the ops)."""
    v = beta.tolist()
    n = len(v)
    d = [v[i][i] for i in range(n)]
    # squared norms of p_i from the pivoted Gram: p_1 = b_0, p_i = b_0 + b_{i-1}
    sq = [d[0]] + [d[0] + 2 * v[0][i] + d[i] for i in range(1, n)]
    bad = not all(math.isfinite(x) for row in v for x in row)
    if bad:  # the other flags mean nothing then
        return True, sq, False, False
    top = max(sq)
    return False, sq, top > 0 and any(x <= SHORT_POINT * top for x in sq), max(map(abs, d)) < TINY_GRAM


def locate_nonfinite(xs, base, key: str) -> None:
    """Raise a MergeInputError naming the first input (or the base) holding NaN/Inf."""
    from .inputs import nonfinite_kind

    for name, x in [(model_name(i), x) for i, x in enumerate(xs)] + [("base_model", base)]:
        if x is None:
            continue
        kind = nonfinite_kind(x)
        if kind:
            raise MergeInputError(f"key '{key}': {name} contains {kind} values")


def _checked(beta: torch.Tensor, xs, base, key: str, norms: bool = True, redo=None) -> torch.Tensor:
    from .inputs import nonfinite_kind

    n = beta.shape[0]
    bad, sq, small, tiny = _gram_flags(beta)  # the one host sync per key
    if not norms and base is not None and not bad:
        bad = nonfinite_kind(base) is not None  # the base cancels in the differences
    if bad:
        locate_nonfinite(xs, base, key)
    if (bad or tiny) and redo is not None:
        # finite inputs whose fp32 products overflowed, or a Gram so small that they may have
        # underflowed: recompute with the rows scaled by a power of two (exact), undone in fp64
        e = rescale_exponent(list(xs) + [base if norms else None], force=bad)
        if e:
            beta = redo(e)
            bad, sq, small, tiny = _gram_flags(beta)
    if bad:
        raise MergeInputError(f"key '{key}': the inputs overflow the compute precision")
    if norms and small and n > 1:
        short = [i for i in range(1, n) if sq[i] <= SHORT_POINT * max(sq)]
        zero = [i for i in short if _is_zero_point(xs[i], base)]
        if len(zero) < len(short) and redo is not None and compute_dtype(*xs, base) != torch.float64:
            # a short point's norm (pivoted: ‖b_0 + b_i‖^2) carries ~1e-7·max‖p‖^2 from fp32
            # products, which can be all of it: its direction is then noise, and a Karcher mean
            # built on it came out longer than every input (test_kernels_fuzz). fp64 resolves it.
            beta = redo(dtype=torch.float64)
        if zero:  # p_i = 0 exactly: b_{i-1} = -b_0, make its Gram rows exact
            r = torch.eye(n, dtype=beta.dtype, device=beta.device)
            for i in zero:
                r[i] = 0
                r[i, 0] = -1
            beta = r @ beta @ r.T
    return beta


def _is_zero_point(x: torch.Tensor, base: torch.Tensor | None, chunk: int = 1 << 22) -> bool:
    fx = x.reshape(-1)
    fb = base.reshape(-1) if base is not None else None
    cdt = compute_dtype(x, base)
    for a in range(0, fx.numel(), chunk):
        part = fx[a:a + chunk].to(cdt)
        if fb is not None:
            part = part - fb[a:a + chunk].to(cdt)
        if bool(part.any()):
            return False
    return True


def centred(grams: torch.Tensor) -> torch.Tensor:
    """The d-block (..., N, N) of augmented Grams, symmetrised."""
    g = grams[..., 1:, 1:]
    return (g + g.transpose(-1, -2)) / 2


def pairwise_distances(grams: torch.Tensor) -> torch.Tensor:
    """(..., N, N) distances ‖p_i - p_j‖ from augmented Grams (zero diagonal)."""
    g = centred(grams)
    d = g.diagonal(dim1=-2, dim2=-1)
    sq = (d.unsqueeze(-1) + d.unsqueeze(-2) - 2 * g).clamp_min(0)
    out = sq.sqrt()
    return out * (1 - torch.eye(out.shape[-1], dtype=out.dtype, device=out.device))


def point_products(grams: torch.Tensor) -> torch.Tensor:
    """(..., N, N) inner products <p_i, p_j> = ‖m‖^2 + <m, d_i> + <m, d_j> + <d_i, d_j> from
    augmented Grams."""
    g0 = grams[..., 0, 1:]
    return grams[..., :1, :1] + g0.unsqueeze(-1) + g0.unsqueeze(-2) + grams[..., 1:, 1:]


def point_norms(grams: torch.Tensor) -> torch.Tensor:
    """(..., N) norms ‖p_i‖ from augmented Grams."""
    return point_products(grams).diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def quad(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched quadratic forms: g (K, M, M), v (K, R, M) -> (K, R) with v_r^T g v_r."""
    return ((v @ g) * v).sum(-1)

"""Fused CPU Gram kernels: the pivoted products of one key in a single read of its inputs.

The eager Gram pass (gram.py) converts each chunk to fp32, forms the differences and takes the
products in separate torch ops, each a pass over the chunk: 1.2-1.7x the time of a hand-written
weighted average over the same tensors. Here the same arithmetic is one torch.compile'd function
per input count N (2, 3, 4) and kind (the full pivoted Gram for Karcher, the centred block only
for the geometric median): inductor fuses the conversion, the differences and every product into
one loop, so each input element is loaded once (0.66-0.89x the time of a compiled weighted
average, which must also write its result).

The sign-elected median registers its own loops here (sign_elected.py: the election and Gram
pass, and the combine, for 2-4 inputs and a base); they compile at their first use, not in the
warm-up, and fall back the same way.

Arithmetic (the same as gram.py): rows b_0 = x_1, b_i = x_{i+1} - x_1 in fp32; every product
b_r·b_s summed in fp32 over sub-blocks of SUB_BLOCK elements, then in fp64 over sub-blocks
(a few 1e-7 relative error per sum, as gram.py). Results differ from the eager kernel's by
summation order only.

Opt-in (BARYCENTER_CPU_KERNELS=fused) because compiling costs time: 10-20 s for the first kernel the
first time on a machine, 1-2 s per further (N, kind, dtype); about 3-4 s per process after (torch
caches the compiled code on disk). In ComfyUI the pack compiles them in the background when the
server starts (warm_up, engine/host_api.py), so a merge queued after that does not wait.
Needs a C++ compiler (inductor's). When anything in compiling fails the process falls back to the
eager kernel for good, with one warning naming the reason, so a given machine always takes the
same path (same inputs, same bits).
A kernel is one parallel loop over the sub-blocks; each sub-block's sums and each fp64 sum over
sub-blocks are done by one thread, so the bits do not depend on the thread count. It runs on the
caller's intra-op threads, or on the count given by loop_threads(): the engine gives the host's
count while the rest of its Gram pass keeps one thread per op (on 2 cores, GM at SD1.5 shapes took
0.55 s (median of 15; best 0.44) against 0.60 s (0.50) with the loop on one thread, and longer
again called from two worker threads).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch

from .errors import error_line
from .threads import intra_op_threads

SUB_BLOCK = 1024
MAX_INPUTS = 4  # N(N+1)/2 products per element; beyond 4 inputs the eager bmm is as good
MIN_BLOCKS = 16  # keys below 16 sub-blocks are not worth a compiled call
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV = "BARYCENTER_CPU_KERNELS"

log = logging.getLogger(__name__)
_lock = threading.Lock()
_compiled: dict = {}  # (N, full) -> compiled function
_ready: set = set()  # (N, full, dtype) compiled and run once
_failed: list[str] = []  # the reason, once compiling failed
_tls = threading.local()  # .loop: loop_threads() counts of this thread, innermost last


def _rows(xs):
    b0 = xs[0].float()
    return [b0] + [x.float() - b0 for x in xs[1:]]


def _pair_sums(rows):
    """(P,) fp64: fp32 sums per sub-block (dim 1), fp64 over sub-blocks, upper triangle row-major."""
    n = len(rows)
    parts = [(rows[r] * rows[s]).sum(1) for r in range(n) for s in range(r, n)]
    return torch.stack(parts).double().sum(1)


# One function per (N, full): torch.compile specialises on the argument count anyway, and separate
# functions keep each one's dtype variants (fp32/fp16/bf16) within dynamo's recompile limit. The
# centred ones (geometric median) skip the pivot row b_0·b_s: 3 products instead of 6 for N = 3.
def _products2(x1, x2):
    return _pair_sums(_rows([x1, x2]))


def _products3(x1, x2, x3):
    return _pair_sums(_rows([x1, x2, x3]))


def _products4(x1, x2, x3, x4):
    return _pair_sums(_rows([x1, x2, x3, x4]))


def _centred2(x1, x2):
    return _pair_sums(_rows([x1, x2])[1:])


def _centred3(x1, x2, x3):
    return _pair_sums(_rows([x1, x2, x3])[1:])


def _centred4(x1, x2, x3, x4):
    return _pair_sums(_rows([x1, x2, x3, x4])[1:])


_SOURCES = {(2, True): _products2, (3, True): _products3, (4, True): _products4,
            (2, False): _centred2, (3, False): _centred3, (4, False): _centred4}
_LABELS: dict = {}  # variant -> its name in the compile log line (register)


def enabled() -> bool:
    return os.environ.get(ENV, "eager").strip().lower() == "fused" and not _failed


_suggested: list[bool] = []


def suggest_once(n_inputs: int) -> None:
    """One INFO line per process at the first CPU Gram pass the fused kernels could take, when
    BARYCENTER_CPU_KERNELS is unset: otherwise the halved CPU merge time is easy to miss."""
    if _suggested or ENV in os.environ or not 2 <= n_inputs <= MAX_INPUTS:
        return
    _suggested.append(True)
    log.info("comfyui-barycenter: CPU merges use the eager Gram kernels; with a C++ compiler installed, "
             "start ComfyUI with %s=fused for about half the merge time (README: CPU merges)", ENV)


def failure() -> str | None:
    """Why compiling failed in this process, or None."""
    return _failed[0] if _failed else None


def status(n_inputs: int | None = None) -> str:
    """One line for reports and logs: which CPU Gram kernel runs for a merge of n_inputs, and why."""
    if _failed:
        return f"eager (fused kernels failed to compile: {_failed[0]})"
    if not enabled():
        return "eager"
    if n_inputs is not None and not 2 <= n_inputs <= MAX_INPUTS:
        return f"eager (the fused kernels take 2-{MAX_INPUTS} inputs)"
    return "fused"


def applicable(flat, numel: int, max_tensors: int = MAX_INPUTS) -> bool:
    """Whether fused_products can take these flattened inputs (CPU, 2-4 inputs, one float dtype);
    max_tensors: a kernel that also takes a base (sign_elected.py) allows one more."""
    n = len(flat)
    x0 = flat[0]
    return (enabled() and 2 <= n <= max_tensors and x0.device.type == "cpu" and x0.dtype in DTYPES
            and all(x.dtype == x0.dtype for x in flat) and numel // SUB_BLOCK >= MIN_BLOCKS)


def fused_products(flat, numel: int, full: bool = True) -> tuple[torch.Tensor, int] | None:
    """(beta, m): the fp64 pivoted Gram (N, N) of the first m = numel - numel % SUB_BLOCK elements
    (full=False: row and column 0 are zero), or None when compiling failed (the caller then uses
    the eager kernel)."""
    n = len(flat)
    s = numel // SUB_BLOCK
    m = s * SUB_BLOCK
    views = [x[:m].view(s, SUB_BLOCK) for x in flat]
    sums = run_variant((n, bool(full)), views)
    return None if sums is None else (beta_from_sums(sums, n, full), m)


def register(variant: tuple, fn, label: str) -> None:
    """Another kernel's compiled loop (sign_elected.py), run by run_variant like the Gram's: fn takes
    1-D fp32 parameter tensors and (blocks, SUB_BLOCK) views of one dtype; label names it in logs."""
    _SOURCES[variant] = fn
    _LABELS[variant] = label


def run_variant(variant: tuple, args):
    """The compiled `variant` applied to args (compiled first if this dtype has not run yet), or None
    when compiling failed (then for good, with one warning: callers use their eager kernel)."""
    if variant + (_dtype(args),) not in _ready:
        return _compile_and_run(variant, args, "first use")
    return _run(_compiled[variant], args)


def _dtype(args) -> torch.dtype:
    return next(a.dtype for a in args if a.dim() == 2)


def _compile_and_run(variant, args, why: str):
    """Compile `variant` for the views' dtype (once per process; concurrent callers wait) and run it
    on args: its result, or None when compiling failed (then for good, with one warning)."""
    sig = variant + (_dtype(args),)
    with _lock:  # compile once, not concurrently from the Gram pass's worker threads or the warm-up
        if _failed:
            return None
        if sig in _ready:
            return _run(_compiled[variant], args)
        label = _LABELS.get(variant) or (f"Gram kernel for {variant[0]} inputs "
                                         f"({'full' if variant[1] else 'centred'}")
        log.log(logging.DEBUG if why == "warm-up" else logging.INFO,
                "comfyui-barycenter: compiling the fused CPU %s, %s; %s)",
                label, str(sig[-1]).replace("torch.", ""), why)
        for v in args:  # compiled for any number of sub-blocks: no recompile per key size
            if v.dim() == 2:
                torch._dynamo.mark_dynamic(v, 0)
        try:
            fn = _compiled.get(variant)
            if fn is None:
                fn = _compiled[variant] = torch.compile(_SOURCES[variant], fullgraph=True)
            out = _run(fn, args)
        except Exception as e:  # no compiler, unsupported platform...: eager from now on
            _failed.append(error_line(e))
            log.warning("comfyui-barycenter: %s=fused but %s; using the eager Gram kernel", ENV, _failed[0])
            return None
        _ready.add(sig)
        return out


def warm_up(dtypes=(torch.float32,)) -> list[tuple]:
    """Compile every variant (2..MAX_INPUTS inputs, full and centred) for each dtype now, so that
    no merge waits for it: the (N, full, dtype) ready after the call (empty when the fused kernels
    are off or do not compile). Runs at the thread count in force, never changes it (the engine
    runs the loops at the host's count, and torch compiles once per count)."""
    done = []
    for dtype in dtypes:
        for n in range(2, MAX_INPUTS + 1):
            for full in (False, True):
                if not enabled():
                    return done
                zeros = [torch.zeros(MIN_BLOCKS, SUB_BLOCK, dtype=dtype) for _ in range(n)]
                if (n, full, dtype) in _ready or _compile_and_run((n, full), zeros, "warm-up") is not None:
                    done.append((n, full, dtype))
    return done


@contextlib.contextmanager
def loop_threads(n: int):
    """Within the block (on this thread) the compiled loops run on n intra-op threads, whatever the
    count around them (the engine's Gram pass sets 1 for its other ops)."""
    stack = _tls.__dict__.setdefault("loop", [])
    stack.append(max(1, int(n)))
    try:
        yield
    finally:
        stack.pop()


def _run(fn, args):
    """fn(*args) on the loop_threads() count if one is set (torch compiles once per count)."""
    stack = getattr(_tls, "loop", None)
    with intra_op_threads(stack[-1] if stack else None):
        return fn(*args)


def beta_from_sums(sums: torch.Tensor, n: int, full: bool) -> torch.Tensor:
    """The pivoted Gram (N, N) fp64 from its upper triangle's sums, row-major (full=False: from row 1)."""
    # built from Python floats: a handful of tiny tensor ops would cost more than the kernel on
    # a small key (the caller reads the values back anyway)
    vals = iter(sums.tolist())
    rows = [[0.0] * n for _ in range(n)]
    for r in range(0 if full else 1, n):
        for c in range(r, n):
            rows[r][c] = rows[c][r] = next(vals)
    return torch.tensor(rows, dtype=torch.float64)

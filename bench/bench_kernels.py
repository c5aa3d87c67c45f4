#!/usr/bin/env python
"""Kernel benchmark: Gram-space geometric median / Karcher against the best weighted average and
against the peers, on N models with the real SD1.5 (or SDXL) UNet key shapes.

    .venv/bin/python bench/bench_kernels.py [--subset F] [--threads T] [--rounds R] [--no-peers]

On a shared machine use --threads 1: with other jobs on the cores, OpenMP fork/joins make
multi-threaded timings vary several-fold between rounds (both for the baseline and for ours).

Data: synthetic fine-tune-like models (bench/_shapes.py: per key base + 1% noise), fp16 storage,
fp32 compute, CPU. Every step is one pass over all keys; the steps run interleaved in R rounds
and each reports its fastest round (median in brackets), so all ratios come from one run under
the same machine load. Our steps, tensor scope (one batched solve over all keys):
  WA            weighted average, three implementations; the fastest is the baseline
  GM            the engine's Gram pass (GramPass: gram_matrix(full=False) per large key, small
                keys batched) + solve("geometric_median")  [+ combine to fp16]
  GM per key    the same with gram_matrix called on every key (the pass before batching)
  GM full Gram  the same with the full augmented Gram (what Karcher needs)
  Karcher       GramPass(full=True) + solve("karcher")  [+ combine to fp16]
  tol 1e-4/1e-10  GM Gram+solve with two tolerances (time must not depend on iterations)
Peers (equal weights, on every --peer-stride-th key, fp16 and fp32 inputs, one run each):
sd-mecha 1.1.8 geometric_median (in process) and mergekit 0.1.5 karcher_merge_tensors (in
.venv-peers, a subprocess that regenerates the same tensors and checks their checksum); our
GM/Karcher are timed on the same keys.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import kernels  # noqa: E402
from _shapes import checksum, synthetic_models, unet_shapes  # noqa: E402

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
MK_RUNNER = ROOT / "tests" / "peers" / "bench_mergekit_karcher.py"


# ---------------------------------------------------------------- weighted-average baselines
def wa_pivot(keys, w, chunk=1 << 18):
    """Hand-written best WA: per chunk r = x_p + Σ (w_i/w_p) x_i in a reused fp32 buffer,
    out = w_p·r written straight to fp16 (one pass per input plus one)."""
    p = max(range(len(w)), key=lambda i: w[i])
    ratios = [(w[i] / w[p], i) for i in range(len(w)) if i != p]
    buf = torch.empty(chunk)
    for xs in keys:
        out = torch.empty_like(xs[0])
        fo = out.view(-1)
        fx = [x.view(-1) for x in xs]
        n = fo.numel()
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            r = buf[: e - a].copy_(fx[p][a:e])
            for c, i in ratios:
                r.add_(fx[i][a:e], alpha=c)
            torch.mul(r, w[p], out=fo[a:e])


def wa_combine(keys, w):
    for xs in keys:
        kernels.combine(xs, w, dtype=xs[0].dtype)


_WA_COMPILED = {}


def wa_fused(keys, w):
    """Weighted average as one torch.compile'd loop per key (the fused kernels' counterpart)."""
    fn = _WA_COMPILED.get(len(w))
    if fn is None:
        coeffs = tuple(w)

        def weighted(*xs):
            acc = xs[0].float() * coeffs[0]
            for c, x in zip(coeffs[1:], xs[1:]):
                acc = acc + x.float() * c
            return acc.to(xs[0].dtype)

        fn = _WA_COMPILED[len(w)] = torch.compile(weighted, dynamic=True)
    for xs in keys:
        fn(*[x.view(-1) for x in xs])


def wa_naive(keys, w):
    for xs in keys:
        acc = xs[0].float() * w[0]
        for c, x in zip(w[1:], xs[1:]):
            acc += x.float() * c
        acc.to(xs[0].dtype)


# ---------------------------------------------------------------- ours
def gram_pass(keys, full):
    """The engine's Gram pass (engine/merge.py): GramPass, small keys batched, the per-key
    checks at the end (given reread, as the engine gives it)."""
    gp = kernels.GramPass(len(keys), full=full, reread=lambda j: (keys[j], None))
    for j, xs in enumerate(keys):
        gp.add(j, xs)
    return gp.result()


def with_kernels(mode, fn):
    """fn run with BARYCENTER_CPU_KERNELS=mode (the fused Gram kernels are opt-in)."""
    def run():
        old = os.environ.get(kernels.fused.ENV)
        os.environ[kernels.fused.ENV] = mode
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(kernels.fused.ENV)
            else:
                os.environ[kernels.fused.ENV] = old
    return run


def fused_available(keys) -> str | None:
    """None when the fused kernels compile here (compiling them now, outside the timed rounds),
    else the reason."""
    with_kernels("fused", lambda: kernels.gram_matrix(keys[max(range(len(keys)), key=lambda j: keys[j][0].numel())]))()
    return kernels.fused.failure()


def ours(keys, method, *, full, tol=None, combine=False, per_key=False):
    if per_key:
        grams = torch.stack([kernels.gram_matrix(xs, full=full) for xs in keys])
    else:
        grams = gram_pass(keys, full)
    params = {} if tol is None else {"tol": tol}
    sol = kernels.solve(method, grams, None, **params)
    if combine:
        rows = sol.coeffs.tolist()
        for xs, row in zip(keys, rows):
            kernels.combine(xs, row, dtype=xs[0].dtype)
    return sol


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_rounds(steps, rounds, once=()):
    times = {name: [] for name, _ in steps}
    for r in range(rounds):
        for name, fn in steps:
            if name in once and r > 0:
                continue
            times[name].append(timed(fn))
            print(f"  round {r + 1}: {name:34s} {times[name][-1]:8.3f} s", file=sys.stderr, flush=True)
    return times


def fmt_row(name, ts, ref):
    best = min(ts)
    med = statistics.median(ts)
    return f"| {name:40s} | {best:8.3f} ({med:7.3f}) | {best / ref:6.2f} |"


# ---------------------------------------------------------------- peers
def sd_mecha_times(keys, dtypes):
    try:
        from sd_mecha.extensions.builtin.merge_methods.ties import geometric_median
    except Exception as e:  # noqa: BLE001
        return None, f"sd-mecha not importable: {e}"
    out = {}
    result = None
    for dt in dtypes:
        t = time.perf_counter()
        res = []
        for xs in keys:
            res.append(geometric_median.__wrapped__(*[x.to(dt) for x in xs], eps=1e-6, maxiter=100, ftol=1e-20))
        out[str(dt).replace("torch.", "")] = time.perf_counter() - t
        if dt == torch.float32:
            result = res
    return (out, result), None


def mergekit_times(kind, stride, n, seed, threads, dtypes, expect_checksum):
    if not PEERS_PYTHON.exists():
        return None, f"{PEERS_PYTHON} missing (bootstrap.sh builds it)"
    cmd = [str(PEERS_PYTHON), str(MK_RUNNER), kind, str(stride), str(n), str(seed), str(threads),
           *[str(d).replace("torch.", "") for d in dtypes]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return None, f"mergekit runner failed: {proc.stderr.strip()[-500:]}"
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if not math.isclose(data["checksum"], expect_checksum, rel_tol=1e-12, abs_tol=1e-9):
        return None, f"mergekit runner saw different tensors (checksum {data['checksum']} vs {expect_checksum})"
    return data, None


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--subset", type=float, default=1.0, help="fraction of the keys (every round(1/F)-th key)")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peer-stride", type=int, default=50,
                    help="peers run on every k-th key (sd-mecha takes ~1 s per 2M params)")
    ap.add_argument("--json", type=str, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    all_shapes = unet_shapes(args.kind)
    stride = max(1, int(round(1.0 / args.subset)))
    shapes = all_shapes[::stride]
    n = args.models
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    models = synthetic_models(shapes, n, args.seed)
    keys = [[m[j] for m in models] for j in range(len(shapes))]
    params = sum(x.numel() for x in models[0])
    gen_s = time.perf_counter() - t0
    w = [1.0 / n] * n
    print(f"generated {n} x {params / 1e6:.1f}M params in {gen_s:.1f} s", file=sys.stderr)

    steps = [
        ("WA: chunked pivot (hand-written)", lambda: wa_pivot(keys, w)),
        ("WA: kernels.combine", lambda: wa_combine(keys, w)),
        ("WA: naive full-tensor fp32", lambda: wa_naive(keys, w)),
        ("GM: Gram + solve", lambda: ours(keys, "geometric_median", full=False)),
        ("GM: Gram + solve + combine", lambda: ours(keys, "geometric_median", full=False, combine=True)),
        ("GM: Gram per key + solve", lambda: ours(keys, "geometric_median", full=False, per_key=True)),
        ("GM: full Gram + solve", lambda: ours(keys, "geometric_median", full=True)),
        ("Karcher: Gram + solve", lambda: ours(keys, "karcher", full=True)),
        ("Karcher: Gram + solve + combine", lambda: ours(keys, "karcher", full=True, combine=True)),
        ("GM: Gram + solve, tol 1e-4", lambda: ours(keys, "geometric_median", full=False, tol=1e-4)),
        ("GM: Gram + solve, tol 1e-10", lambda: ours(keys, "geometric_median", full=False, tol=1e-10)),
    ]
    fused_why = fused_available(keys)
    if fused_why is None:
        wa_fused(keys[:1], w)  # compile outside the rounds
        steps[3:3] = [("WA: fused (torch.compile)", lambda: wa_fused(keys, w))]
        steps += [
            ("GM fused: Gram + solve", with_kernels("fused", lambda: ours(keys, "geometric_median", full=False))),
            ("GM fused: Gram + solve + combine",
             with_kernels("fused", lambda: ours(keys, "geometric_median", full=False, combine=True))),
            ("Karcher fused: Gram + solve", with_kernels("fused", lambda: ours(keys, "karcher", full=True))),
            ("Karcher fused: Gram + solve + combine",
             with_kernels("fused", lambda: ours(keys, "karcher", full=True, combine=True))),
        ]
    else:
        print(f"fused kernels unavailable: {fused_why}", file=sys.stderr)
    times = run_rounds(steps, args.rounds, once=("WA: naive full-tensor fp32",))
    wa_names = [s for s, _ in steps if s.startswith("WA")]
    best_wa_name = min(wa_names, key=lambda s: min(times[s]))
    ref = min(times[best_wa_name])

    # solver-only numbers and iteration counts
    g_gm = gram_pass(keys, False)
    g_full = gram_pass(keys, True)
    sol_info = {}
    for label, method, g, tol in (("GM tol 1e-4", "geometric_median", g_gm, 1e-4),
                                  ("GM tol 1e-10", "geometric_median", g_gm, 1e-10),
                                  ("Karcher", "karcher", g_full, None)):
        kw = {} if tol is None else {"tol": tol}
        ts = [timed(lambda: kernels.solve(method, g, None, **kw)) for _ in range(3)]
        sol = kernels.solve(method, g, None, **kw)
        it = sol.record["iterations"].double()
        sol_info[label] = (min(ts), float(it.mean()), int(it.max()), int(sol.record["converged"].sum()))

    lines = []
    lines.append(f"## comfyui-barycenter kernel bench ({args.kind.upper()} UNet)")
    lines.append("")
    lines.append(f"{len(shapes)} of {len(all_shapes)} keys, {params / 1e6:.1f}M params x {n} models, fp16 storage, "
                 f"fp32 compute, CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                 f"{threads} thread(s), {args.rounds} rounds; load average before {load0[0]:.1f}, "
                 f"after {os.getloadavg()[0]:.1f}")
    lines.append("")
    lines.append(f"| step | best s (median) | x best WA |")
    lines.append("|---|---|---|")
    for name, _ in steps:
        lines.append(fmt_row(name + (" (baseline)" if name == best_wa_name else ""), times[name], ref))
    a, b = min(times["GM: Gram + solve, tol 1e-4"]), min(times["GM: Gram + solve, tol 1e-10"])
    lines.append("")
    lines.append(f"tol 1e-10 / tol 1e-4 time: {b / a:.3f}")
    lines.append("")
    lines.append("| solve only (all keys at once) | s | mean iterations | max | converged |")
    lines.append("|---|---|---|---|---|")
    for label, (s, mean_it, max_it, conv) in sol_info.items():
        lines.append(f"| {label} | {s:.4f} | {mean_it:.1f} | {max_it} | {conv}/{len(keys)} |")

    result = {"params": params, "keys": len(shapes), "threads": threads,
              "times": times, "best_wa": best_wa_name, "solve": sol_info}
    if not args.no_peers:
        pshapes = all_shapes[::args.peer_stride]
        pmodels = synthetic_models(pshapes, n, args.seed)
        pkeys = [[m[j] for m in pmodels] for j in range(len(pshapes))]
        pparams = sum(x.numel() for x in pmodels[0])
        ours_steps = [
            ("WA: chunked pivot (hand-written)", lambda: wa_pivot(pkeys, w)),
            ("GM: Gram + solve", lambda: ours(pkeys, "geometric_median", full=False)),
            ("GM: Gram + solve + combine", lambda: ours(pkeys, "geometric_median", full=False, combine=True)),
            ("Karcher: Gram + solve", lambda: ours(pkeys, "karcher", full=True)),
            ("Karcher: Gram + solve + combine", lambda: ours(pkeys, "karcher", full=True, combine=True)),
        ]
        ptimes = run_rounds(ours_steps, args.rounds)
        dtypes = (torch.float16, torch.float32)
        sm, sm_err = sd_mecha_times(pkeys, dtypes)
        mk, mk_err = mergekit_times(args.kind, args.peer_stride, n, args.seed, threads, dtypes, checksum(pmodels[0]))
        notes = []
        lines.append("")
        lines.append(f"### peers, equal weights, every {args.peer_stride}th key ({len(pshapes)} keys, "
                     f"{pparams / 1e6:.1f}M params x {n}), one run each")
        lines.append("")
        lines.append("| step | s | ours faster by |")
        lines.append("|---|---|---|")
        for name, _ in ours_steps:
            lines.append(f"| ours {name} | {min(ptimes[name]):.3f} | |")
        gm_ours = min(ptimes["GM: Gram + solve"]), min(ptimes["GM: Gram + solve + combine"])
        ka_ours = min(ptimes["Karcher: Gram + solve"]), min(ptimes["Karcher: Gram + solve + combine"])
        if sm is not None:
            sm_t, sm_res = sm
            for dt, s in sm_t.items():
                lines.append(f"| sd-mecha 1.1.8 geometric_median ({dt} inputs) | {s:.3f} | "
                             f"{s / gm_ours[0]:.1f}x (Gram+solve), {s / gm_ours[1]:.1f}x (+combine) |")
            sol = ours(pkeys, "geometric_median", full=False)
            gaps = []
            for xs, row, r in zip(pkeys, sol.coeffs.tolist(), sm_res):
                X = torch.stack([x.double().reshape(-1) for x in xs])
                y = (torch.tensor(row, dtype=torch.float64)[:, None] * X).sum(0)
                o_ours = float((X - y).norm(dim=1).sum())
                o_sm = float((X - r.double().reshape(-1)).norm(dim=1).sum())
                gaps.append((o_ours - o_sm) / o_sm)
            notes.append(f"GM objective Σ‖x_i - y‖ (fp64) of ours relative to sd-mecha's fp32 result, per key: "
                         f"min {min(gaps):+.1e}, max {max(gaps):+.1e} (negative: ours is closer to the median)")
        else:
            lines.append(f"| sd-mecha: {sm_err} | | |")
        if mk is not None:
            for dt, s in mk["seconds"].items():
                lines.append(f"| mergekit {mk['version']} karcher_merge_tensors ({dt} inputs) | {s:.3f} | "
                             f"{s / ka_ours[0]:.1f}x (Gram+solve), {s / ka_ours[1]:.1f}x (+combine) |")
        else:
            lines.append(f"| mergekit: {mk_err} | | |")
        lines += [""] + notes
        result["peers"] = {"params": pparams, "ours": ptimes, "sd_mecha": sm[0] if sm else sm_err,
                           "mergekit": mk if mk else mk_err}
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""CUDA benchmark: the Gram pass on a GPU against the device's own measured ceilings.

    python bench/bench_cuda.py [--kind sd15 sdxl] [--models 3] [--rounds 5]

1. Ceilings, measured in this run: device-to-device copy (bytes read + written per second), and
   host-to-device copies of 1 GiB from pageable and from pinned host memory.
2. Inputs in GPU memory (models ComfyUI has loaded): one read of every key of every input
   (a sum per key: read-only) vs the engine's Gram pass + solve for the geometric median
   (centred Grams) and Karcher (full); achieved bandwidth = input bytes / time.
3. Inputs in host RAM (how ComfyUI keeps a model it has not loaded: the usual case for merge
   inputs): one transfer of every key to the GPU with .to() (pageable: what ComfyUI's own load
   does) vs the engine's pass, which moves each key through a ring of pinned buffers
   (engine/staging.py) as it reads it.
"before" rows: the pass as it was (plain copies, gram_matrix's host sync per key, GPU solve).
Every time is the fastest of --rounds (median in brackets), torch.cuda.synchronize() before the
clock stops; data: bench/_shapes.py synthetic fine-tunes, fp16 storage.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import kernels  # noqa: E402
from _shapes import synthetic_models, unet_shapes  # noqa: E402
from harness.loading import load_file  # noqa: E402

GB = 1e9


def timed(fn, rounds):
    fn()  # warm: allocator, cuBLAS handles
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def ceilings(dev, rounds):
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    b = torch.empty_like(a)
    d2d = timed(lambda: b.copy_(a), rounds)[0]
    host = torch.empty(n, dtype=torch.uint8).random_(0, 255)
    pageable = timed(lambda: b.copy_(host), rounds)[0]
    pinned_host = host.pin_memory()
    pinned = timed(lambda: b.copy_(pinned_host, non_blocking=True), rounds)[0]
    out = {"d2d copy (read+write)": 2 * n / d2d, "h2d pageable": n / pageable, "h2d pinned": n / pinned}
    # the pinned ring's CPU side: pageable -> pinned in 16 MiB pieces (bytes copied per second)
    piece = pinned_host[: 16 << 20]
    threads = torch.get_num_threads()
    for t in sorted({1, 4, threads}):
        torch.set_num_threads(t)

        def to_pinned():
            for a0 in range(0, n, piece.numel()):
                piece.copy_(host[a0:a0 + piece.numel()])
        out[f"host pageable -> pinned, {t} thread(s)"] = n / timed(to_pinned, rounds)[0]
    torch.set_num_threads(threads)
    del a, b, pinned_host, piece
    torch.cuda.empty_cache()
    return out


staging = load_file("engine/staging.py", "barycenter_staging")  # alone: the engine package imports ComfyUI


def gram_pass(keys, dev, full, from_host, engine=True):
    """The engine's Gram pass (engine/merge.py): inputs moved through the pinned ring, checks
    deferred to one sync. engine=False: the pass before (plain .to(), a host sync per key)."""
    move = staging.Mover(dev) if from_host and engine else None

    def read(j):
        if not from_host:
            return keys[j]
        return move.many(keys[j]) if move else [x.to(dev, non_blocking=True) for x in keys[j]]

    gp = kernels.GramPass(len(keys), full=full, reread=(lambda j: (read(j), None)) if engine else None)
    for j, xs in (staging.moved_groups(keys, move) if move else ((j, read(j)) for j in range(len(keys)))):
        gp.add(j, xs)
    return gp.result()


def merge(keys, dev, method, from_host, engine=True):
    grams = gram_pass(keys, dev, method != "geometric_median", from_host, engine)
    return kernels.solve(method, grams.cpu() if engine else grams, None)  # the engine solves on the CPU


def one_read_resident(keys):
    for xs in keys:
        for x in xs:
            torch.sum(x, dtype=torch.float32)


def one_transfer(keys, dev, pinned=False):
    if pinned:  # as the engine reads: consecutive keys together through the ring
        for _ in staging.moved_groups(keys, staging.Mover(dev)):
            pass
        return
    for xs in keys:
        for x in xs:
            x.to(dev, non_blocking=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", nargs="+", default=["sd15"], choices=["sd15", "sdxl"])
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device here", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    props = torch.cuda.get_device_properties(dev)
    print(f"# bench_cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    ceil = ceilings(dev, args.rounds)
    print("\n| ceiling (measured) | GB/s |\n|---|---|")
    for k, v in ceil.items():
        print(f"| {k} | {v / GB:.1f} |")
    read_rate = ceil["d2d copy (read+write)"] / 2  # a copy reads half the bytes it moves
    for kind in args.kind:
        shapes = unet_shapes(kind)
        t0 = time.perf_counter()
        host_models = synthetic_models(shapes, args.models, args.seed)
        keys_host = [[m[j] for m in host_models] for j in range(len(shapes))]
        nbytes = sum(x.numel() * x.element_size() for xs in keys_host for x in xs)
        params = sum(x.numel() for x in host_models[0])
        print(f"\n## {kind.upper()} UNet: {len(shapes)} keys, {params / 1e6:.1f}M params x {args.models} models "
              f"fp16 = {nbytes / GB:.2f} GB (made in {time.perf_counter() - t0:.0f} s)")
        keys_dev = [[x.to(dev) for x in xs] for xs in keys_host]
        torch.cuda.synchronize()
        rows = []

        def add(name, fn, floor=None):
            best, med = timed(fn, args.rounds)
            rows.append((name, best, med, floor))

        add("inputs in GPU memory: one read (a sum per key)", lambda: one_read_resident(keys_dev))
        add("  GM: Gram pass", lambda: gram_pass(keys_dev, dev, False, False), "resident")
        add("  GM: Gram pass + solve", lambda: merge(keys_dev, dev, "geometric_median", False), "resident")
        add("  Karcher: Gram pass + solve", lambda: merge(keys_dev, dev, "karcher", False), "resident")
        add("  GM, before: a host sync per key, solve on the GPU",
            lambda: merge(keys_dev, dev, "geometric_median", False, engine=False), "resident")
        add("inputs in host RAM: one transfer to the GPU (pageable)", lambda: one_transfer(keys_host, dev))
        add("  one transfer through the pinned ring", lambda: one_transfer(keys_host, dev, True), "host")
        add("  GM: Gram pass", lambda: gram_pass(keys_host, dev, False, True), "host")
        add("  Karcher: Gram pass", lambda: gram_pass(keys_host, dev, True, True), "host")
        add("  GM: Gram pass + solve", lambda: merge(keys_host, dev, "geometric_median", True), "host")
        add("  Karcher: Gram pass + solve", lambda: merge(keys_host, dev, "karcher", True), "host")
        add("  GM, before: pageable copies, a host sync per key, solve on the GPU",
            lambda: merge(keys_host, dev, "geometric_median", True, engine=False), "host")
        base = {"resident": rows[0][1], "host": rows[5][1]}
        print(f"\n| step | best s (median) | GB/s of input | x one read | vs device |\n|---|---|---|---|---|")
        for name, best, med, floor in rows:
            rate = nbytes / best
            ref = base[floor] if floor else best
            resident = "GPU memory" in name or floor == "resident"
            device_rate, what = (read_rate, "HBM read") if resident else (ceil["h2d pinned"], "h2d pinned")
            print(f"| {name} | {best:.4f} ({med:.4f}) | {rate / GB:.1f} | {best / ref:.2f} | "
                  f"{100 * rate / device_rate:.0f}% of {what} |")
        # the CUDA Grams equal the CPU ones up to summation order
        g_cpu = gram_pass(keys_host[::7], torch.device("cpu"), True, False, engine=False)
        g_gpu = gram_pass(keys_dev[::7], dev, True, False).cpu()
        rel = float(((g_gpu - g_cpu).abs().amax((1, 2)) / g_cpu.abs().amax((1, 2))).max())
        print(f"\nCUDA vs CPU augmented Grams (every 7th key): max relative difference {rel:.1e}")
        del keys_dev
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

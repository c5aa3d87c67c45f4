"""Benchmark: OT fusion of real-shape SD UNets on the CPU (random fp16 weights).

    .venv/bin/python bench/bench_ot.py            # SD1.5 same-base pair (goal <= 30 s)
    .venv/bin/python bench/bench_ot.py --sdxl     # + two unrelated SDXL UNets (goal <= 15 min, ~12 GB RAM)
    .venv/bin/python bench/bench_ot.py --sd15-unrelated   # + an unrelated SD1.5 pair

Key names and shapes come from ComfyUI's UNetModel built on the `meta` device with the SD1.5 /
SDXL config of comfy/supported_models.py (confirmed by ComfyUI's own detector). Weights: random
fp16, scaled 1/sqrt(fan_in); a "same-base" partner is the first model + 1% noise, an "unrelated"
one is drawn independently. Prints a table: seconds to align (solve every group's map) and to
produce the output (gather, barycenter, cast to fp16), groups whose identity map was certified
without a cost matrix, identity fraction, peak RSS. SDXL weights are regenerated from per-key seeds
on every read instead of held in RAM (two fp16 SDXL UNets are 10 GB); that generation time is
measured and left out of the reported times.

Measured on the dev machine (2-core CPU, torch 2.13 CPU, exact solver; other sessions shared it):
  SD1.5 same-base   9.3 s (2 threads, idle; 88/88 groups certified identity), 14.5 s (1 thread, load ~5)
  SD1.5 unrelated   170 s (2 threads, idle: align 94 s, output 76 s)
  SDXL unrelated    881 s (1 thread, load 3-5: align 847 s, output 34 s; weight generation excluded)
On a loaded 2-core machine one thread is much faster than two (two spinning OpenMP threads
against other processes): use --threads 1 there.
"""
from __future__ import annotations

import argparse
import math
import resource
import zlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests" / "ot"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from harness.host import import_in_process  # noqa: E402


def _key_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFFFFFF


def _scale(shp) -> float:
    return 1.0 / math.sqrt(math.prod(shp[1:])) if len(shp) > 1 else 0.1


def weight(shp, seed: int, key: str, related: bool, which: int, noise: float = 0.01) -> torch.Tensor:
    """Model `which` (0 or 1) of a pair, key by key, from per-key seeds (deterministic)."""
    g = torch.Generator().manual_seed(_key_seed(seed if which == 0 or related else seed + 7, key))
    x = torch.randn(shp, generator=g) * _scale(shp)
    if which == 1 and related:
        g2 = torch.Generator().manual_seed(_key_seed(seed + 13, key))
        x += noise * _scale(shp) * torch.randn(shp, generator=g2)
    return x.half()


class Pair:
    """read(i, key) for two random fp16 models. In memory (`lazy=False`), or regenerated on every
    read (`lazy=True`: no RAM for two SDXL UNets, 10 GB; the time spent generating is measured
    and subtracted from the reported times)."""

    def __init__(self, shapes: dict, related: bool, seed: int, lazy: bool):
        self.shapes, self.related, self.seed, self.lazy = shapes, related, seed, lazy
        self.read_s = 0.0
        self.store = None
        if not lazy:
            self.store = [{k: weight(v, seed, k, related, i) for k, v in shapes.items()} for i in (0, 1)]

    def __call__(self, i: int, key: str) -> torch.Tensor:
        if self.store is not None:
            return self.store[i][key]
        t = time.perf_counter()
        out = weight(self.shapes[key], self.seed, key, self.related, i)
        self.read_s += time.perf_counter() - t
        return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def run(name: str, family: str, related: bool, solver: str, seed: int = 0, cost_dtype=torch.float32,
        lazy: bool = False) -> dict:
    from unet_configs import check_detected, meta_shapes, real_config

    from kernels.ot import ot_fuse

    shapes = meta_shapes(real_config(family))
    check_detected(shapes, family)
    t = time.perf_counter()
    pair = Pair(shapes, related, seed, lazy)
    gen_s = time.perf_counter() - t
    count = [0]

    def sink(key, tensor):  # the node hands tensors to ComfyUI; here they are only counted
        count[0] += tensor.numel()

    t = time.perf_counter()
    last = [t]

    def progress(done, total):  # a line every 30 s, so a long run shows where it is
        now = time.perf_counter()
        if now - last[0] > 30:
            last[0] = now
            print(f"    {name}: {done}/{total} steps, {now - t:.0f} s (generating weights: {pair.read_s:.0f} s)",
                  flush=True)

    _, rep = ot_fuse(pair, shapes, 2, solver=solver, out_dtype=torch.float16, sink=sink,
                     progress=progress, cost_dtype=cost_dtype)
    total = time.perf_counter() - t - pair.read_s
    frac = rep["seconds"]["align"] / max(rep["seconds"]["align"] + rep["seconds"]["output"], 1e-9)
    return {"case": name, "params": sum(math.prod(s) for s in shapes.values()), "groups": rep["spec"]["groups"],
            "solver": solver, "gen_s": gen_s + pair.read_s, "align_s": rep["seconds"]["align"] - frac * pair.read_s,
            "output_s": rep["seconds"]["output"] - (1 - frac) * pair.read_s, "total_s": total,
            "identity": rep["alignment"]["model_2"]["identity_fraction"], "rss_gb": peak_rss_gb(),
            "certified": sum(g["models"]["model_2"]["certified_identity"] for g in rep["groups"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdxl", action="store_true", help="also fuse two unrelated SDXL UNets (heavy)")
    ap.add_argument("--sd15-unrelated", action="store_true", help="also fuse two unrelated SD1.5 UNets")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-sd15", action="store_true", help="skip the SD1.5 same-base case")
    ap.add_argument("--bf16-cost", action="store_true", help="cost matmuls in bfloat16 (fp32 accumulate)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    host = import_in_process()
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"host: {host.kind} ({host.tree}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {load}", flush=True)
    cases = [] if args.no_sd15 else [("SD1.5 same-base", "SD15", True, 30.0)]
    if args.sd15_unrelated:
        cases.append(("SD1.5 unrelated", "SD15", False, None))
    if args.sdxl:
        cases.append(("SDXL unrelated", "SDXL", False, 900.0))
    rows = []
    for name, fam, related, goal in cases:
        r = run(name, fam, related, "exact", cost_dtype=torch.bfloat16 if args.bf16_cost else torch.float32,
                lazy=(fam == "SDXL"))
        r["goal_s"] = goal
        rows.append(r)
        print(f"  done: {name}: {r['total_s']:.1f} s", flush=True)
    head = (f"{'case':18} {'params':>8} {'groups':>6} {'certif.':>7} {'solver':>6} {'align s':>8} {'output s':>8} "
            f"{'total s':>8} {'goal s':>7} {'identity':>8} {'peak RSS':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        goal = f"{r['goal_s']:.0f}" if r["goal_s"] else "-"
        print(f"{r['case']:18} {r['params'] / 1e6:7.0f}M {r['groups']:6d} {r['certified']:7d} {r['solver']:>6} {r['align_s']:8.1f} "
              f"{r['output_s']:8.1f} {r['total_s']:8.1f} {goal:>7} {r['identity']:8.3f} {r['rss_gb']:6.1f}GB")


if __name__ == "__main__":
    main()

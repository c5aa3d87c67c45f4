"""Benchmark: OT fusion of real-shape SD UNets on the CPU (random fp16 weights).

    .venv/bin/python bench/bench_ot.py            # SD1.5 same-base pair (goal <= 30 s)
    .venv/bin/python bench/bench_ot.py --sdxl     # + two unrelated SDXL UNets (goal <= 15 min, ~12 GB RAM)
    .venv/bin/python bench/bench_ot.py --sd15-unrelated   # + an unrelated SD1.5 pair

Key names and shapes come from ComfyUI's UNetModel built on the `meta` device with the SD1.5 /
SDXL config of comfy/supported_models.py (confirmed by ComfyUI's own detector). Weights: random
fp16, scaled 1/sqrt(fan_in); a "same-base" partner is the first model + 1% noise, an "unrelated"
one is drawn independently. Prints a table: seconds to align (solve every group's map) and to
produce the output (gather, barycenter, cast to fp16), identity fraction, peak RSS.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests" / "ot"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from harness.host import import_in_process  # noqa: E402


def make_models(shapes: dict, related: bool, seed: int, noise: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for k, shp in shapes.items():
        fan_in = math.prod(shp[1:]) if len(shp) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shp) > 1 else 0.1
        x = torch.randn(shp, generator=g) * scale
        a[k] = x.half()
        if related:
            b[k] = (x + noise * scale * torch.randn(shp, generator=g)).half()
        else:
            b[k] = (torch.randn(shp, generator=g) * scale).half()
        del x
    return a, b


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def run(name: str, family: str, related: bool, solver: str, seed: int = 0) -> dict:
    from unet_configs import check_detected, meta_shapes, real_config

    from kernels.ot import ot_fuse

    shapes = meta_shapes(real_config(family))
    check_detected(shapes, family)
    t = time.perf_counter()
    a, b = make_models(shapes, related, seed)
    gen_s = time.perf_counter() - t
    models = (a, b)
    count = [0]

    def sink(key, tensor):  # the node hands tensors to ComfyUI; here they are only counted
        count[0] += tensor.numel()

    t = time.perf_counter()
    _, rep = ot_fuse(lambda i, k: models[i][k], shapes, 2, solver=solver, out_dtype=torch.float16, sink=sink)
    total = time.perf_counter() - t
    del a, b, models
    return {"case": name, "params": sum(math.prod(s) for s in shapes.values()), "groups": rep["spec"]["groups"],
            "solver": solver, "gen_s": gen_s, "align_s": rep["seconds"]["align"], "output_s": rep["seconds"]["output"],
            "total_s": total, "identity": rep["alignment"]["model_2"]["identity_fraction"], "rss_gb": peak_rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdxl", action="store_true", help="also fuse two unrelated SDXL UNets (heavy)")
    ap.add_argument("--sd15-unrelated", action="store_true", help="also fuse two unrelated SD1.5 UNets")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    host = import_in_process()
    print(f"host: {host.kind} ({host.tree}); torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    cases = [("SD1.5 same-base", "SD15", True, 30.0)]
    if args.sd15_unrelated:
        cases.append(("SD1.5 unrelated", "SD15", False, None))
    if args.sdxl:
        cases.append(("SDXL unrelated", "SDXL", False, 900.0))
    rows = []
    for name, fam, related, goal in cases:
        r = run(name, fam, related, "exact")
        r["goal_s"] = goal
        rows.append(r)
        print(f"  done: {name}: {r['total_s']:.1f} s", flush=True)
    head = f"{'case':18} {'params':>8} {'groups':>6} {'solver':>6} {'align s':>8} {'output s':>8} {'total s':>8} {'goal s':>7} {'identity':>8} {'peak RSS':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        goal = f"{r['goal_s']:.0f}" if r["goal_s"] else "-"
        print(f"{r['case']:18} {r['params'] / 1e6:7.0f}M {r['groups']:6d} {r['solver']:>6} {r['align_s']:8.1f} "
              f"{r['output_s']:8.1f} {r['total_s']:8.1f} {goal:>7} {r['identity']:8.3f} {r['rss_gb']:6.1f}GB")


if __name__ == "__main__":
    main()

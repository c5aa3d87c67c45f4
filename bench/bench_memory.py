"""Peak RAM of big merges, in-process: 3 SDXL UNets and 8 SD1.5 UNets at real shapes (random
fine-tune-like weights, fp16 as loaded), merged by the geometric median and the Karcher mean.

    .venv/bin/python -m bench.bench_memory [--config sdxl3 sd15x8] [--methods gm karcher]

ComfyUI is imported in this process (the PyPI snapshot, or COMFYUI_DIR) and the UNets are built
as its loader builds them (comfy.sd.load_unet_state_dict, fp16 forced as --fp16-unet does); the
first from a generated state dict, the others as copies with their weights overwritten key by key,
so building them never needs more than one spare model of memory. Each merge runs the pack's node
(device cpu) and is timed; a sampling thread records the process's peak RSS. Printed per merge:
seconds, ratio to one read of the inputs (every byte read once: bench_host.read_once, on one
thread as each op of the engine's CPU Gram pass), peak RSS and peak RSS minus the RSS before the merge, both
against the inputs' size. Each config runs in its own process so peaks do not carry over.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._shapes import unet_shapes  # noqa: E402
from bench.bench_host import PeakRSS, read_once, rss_bytes  # noqa: E402
from harness import loading  # noqa: E402

CONFIGS = {"sdxl3": ("sdxl", 3), "sd15x8": ("sd15", 8)}
METHODS = {
    "gm": ("BarycenterGeometricMedian", {"tolerance": 1e-7, "max_iterations": 100, "eps": 1e-8, "scope": "tensor"}),
    "karcher": ("BarycenterKarcherMean", {"tolerance": 1e-7, "max_iterations": 100, "scope": "tensor"}),
}
GiB = 2 ** 30


def load_pack():
    return loading.load_pack().NODE_CLASS_MAPPINGS


def _key_weights(j: int, shape, model: int, spread: float = 0.01):
    """Key j of fine-tune `model`: a shared base N(0, 0.05²) plus its own small noise (fp32)."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * j + 17)
    base = torch.randn(shape, generator=g).mul_(0.05)
    g.manual_seed(1_000_003 * j + 101 + model)
    return base.add_(torch.randn(shape, generator=g), alpha=0.05 * spread)


def build_models(arch: str, n: int):
    """n ComfyUI ModelPatchers of `arch`'s real UNet shapes, fp16, distinct fine-tune-like weights."""
    import torch
    import comfy.model_patcher
    import comfy.sd
    from comfy.cli_args import args

    args.fp16_unet = True  # as --fp16-unet: CPU would otherwise load fp32 (twice the memory)
    shapes = [(k[len("diffusion_model."):], s) for k, s in unet_shapes(arch)]
    sd = {k: _key_weights(j, s, 0).half() for j, (k, s) in enumerate(shapes)}
    first = comfy.sd.load_unet_state_dict(sd)
    del sd
    gc.collect()
    models = [first]
    for i in range(1, n):
        module = copy.deepcopy(first.model)
        params = module.diffusion_model.state_dict()
        with torch.no_grad():
            for j, (k, s) in enumerate(shapes):
                params[k].copy_(_key_weights(j, s, i))
        models.append(comfy.model_patcher.ModelPatcher(module, first.load_device, first.offload_device))
    return models


def one_read(models) -> float:
    from kernels.threads import intra_op_threads

    with intra_op_threads(1):
        t = time.perf_counter()
        read_once([w for m in models for w in m.model.diffusion_model.state_dict().values()])
        return time.perf_counter() - t


def run_config(name: str, methods: list[str]) -> dict:
    import torch

    os.environ["BARYCENTER_GRAM_CACHE"] = "0"  # each merge reads its inputs

    from harness.host import import_in_process

    host = import_in_process()
    nodes = load_pack()
    arch, n = CONFIGS[name]
    t = time.perf_counter()
    with torch.inference_mode():
        models = build_models(arch, n)
        build_s = time.perf_counter() - t
        sd0 = models[0].model.diffusion_model.state_dict()
        one_model = sum(w.numel() * w.element_size() for w in sd0.values())
        dtype = str(next(iter(sd0.values())).dtype).replace("torch.", "")
        params = sum(w.numel() for w in sd0.values())
        del sd0
        inputs = one_model * n
        read_s = one_read(models)
        rows = []
        for m in methods:
            cls, settings = METHODS[m]
            gc.collect()
            with PeakRSS() as p:
                t = time.perf_counter()
                merged, report = nodes[cls]().merge(**{f"model_{i + 1}": x for i, x in enumerate(models)},
                                                     weights="", device="cpu", **settings)
                secs = time.perf_counter() - t
            rep = json.loads(report)
            conv = sum(bool(u.get("converged", True)) for u in rep["units"])
            rows.append({"method": m, "seconds": secs, "ratio_to_read": secs / read_s,
                         "rss_before": p.base, "peak_rss": p.peak, "extra": p.extra,
                         "units": len(rep["units"]), "converged": conv})
            del merged, report, rep
    return {"config": name, "arch": arch, "models": n, "params": params, "dtype": dtype,
            "one_model": one_model, "inputs": inputs, "build_s": build_s, "read_s": read_s,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rows": rows,
            "host": host.kind}


def table(results: list[dict]) -> str:
    lines = ["| models | method | seconds | / one read | peak RSS | peak RSS / inputs | extra during merge | "
             "extra / one model | converged |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        what = f"{r['models']}× {r['arch'].upper()} UNet ({r['params'] / 1e6:.0f}M, {r['dtype']})"
        for row in r["rows"]:
            lines.append(
                f"| {what} | {row['method']} | {row['seconds']:.1f} | {row['ratio_to_read']:.2f} | "
                f"{row['peak_rss'] / GiB:.2f} GiB | {row['peak_rss'] / r['inputs']:.3f} | "
                f"{row['extra'] / 2**20:.0f} MiB | {100 * row['extra'] / r['one_model']:.1f}% | "
                f"{row['converged']}/{row['units']} |")
    notes = [f"- {r['models']}× {r['arch'].upper()}: inputs {r['inputs'] / GiB:.2f} GiB, one read "
             f"{r['read_s']:.1f} s, process max RSS {r['max_rss'] / GiB:.2f} GiB (building included), "
             f"{r['host']} ComfyUI" for r in results]
    return "\n".join(lines + [""] + notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_config(args.child, args.methods)))
        return 0
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"# bench_memory: {os.cpu_count()} CPUs, {total / GiB:.1f} GiB RAM; {time.strftime('%Y-%m-%d %H:%M')}")
    results = []
    for name in args.config:
        proc = subprocess.run([sys.executable, "-m", "bench.bench_memory", "--child", name, "--methods", *args.methods],
                              cwd=ROOT, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: the child process failed (rc {proc.returncode})")
        results.append(json.loads(found[-1][len("RESULT "):]))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merge nodes in the real host: queue-to-first-sampler-step, node time vs one read, peak RAM.

    .venv/bin/python -m bench.bench_host [--arch sd15 sd15_full] [--repeats 3]

1. Through the HTTP API (a real ComfyUI: CPU, or its own device with BARYCENTER_COMFY_GPU=1):
   time from POST /prompt to the KSampler's first progress event, for the geometric median of 3
   models vs a chain of two ModelMergeSimple on the same 3 models (the loaders are warm in both;
   each timed prompt changes one merge setting so the merge really runs). Ratio = GM / chain
   (goal <= 1.3). With the Gram cache on (the default) the re-queued GM reuses its Grams (only the
   solve runs: a mixer changing a weight); with --gram-cache off every GM prompt reads the inputs
   again (a merge of new inputs). A server with --kernels fused compiles them when it starts, and
   its first prompt is queued once its log says they are ready; --fused-warm-up off adds (or,
   alone, runs) a server whose first merge compiles them ('first' GM: the difference).
2. In-process (ComfyUI imported, models loaded as the host loads them): the merge node's time vs
   one read of the 3 inputs' weights, the floor of any merge that reads them: on CPU every byte
   read once and nothing written (read_once), on a GPU every tensor moved to it
   and cast to fp32 there (as ComfyUI's load does; and through the engine's pinned buffers); goal
   <= 1.25 for GM and Karcher. An fp32 copy of the inputs (ComfyUI's CPU load writes one) is
   shown beside it, not used as the floor: it also writes, and at real shapes each fresh copy
   page-faults. The element and sign-elected medians (tensor methods: they write every merged
   tensor, as the fp32 copy does) run on the same models, the latter with their base. With --kernels eager fused the GM, Karcher and sign-elected median nodes run with each kernel choice.
   Peak extra RSS of the merge vs the size of one model (goal <= 5% for linear results).
Prints one table; every ratio is measured in this run.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import checkpoints  # noqa: E402
from harness.graphs import Graph, conditioning, load_checkpoint, merge_node  # noqa: E402

SOLVER = {"max_iterations": 100, "eps": 1e-8, "scope": "tensor"}
KERNELS_ENV = "BARYCENTER_CPU_KERNELS"
CACHE_ENV = "BARYCENTER_GRAM_CACHE"
WARM_UP_ENV = "BARYCENTER_FUSED_WARM_UP"


def family(arch):
    return [checkpoints.checkpoint(arch, seed=s, base_seed=0, noise=0.05) for s in (1, 2, 3)]


def _sampler_graph(names, kind, knob):
    g = Graph()
    ls = [load_checkpoint(g, n) for n in names]
    if kind == "gm":
        m = merge_node(g, "BarycenterGeometricMedian", [Graph.out(l, 0) for l in ls],
                       tolerance=1e-7 * (1 + knob * 1e-3), **SOLVER)
        model = Graph.out(m, 0)
    else:  # ModelMergeSimple chain: ((1,2) then with 3)
        a = g.add("ModelMergeSimple", model1=Graph.out(ls[0], 0), model2=Graph.out(ls[1], 0), ratio=0.5 + knob * 1e-4)
        b = g.add("ModelMergeSimple", model1=Graph.out(a, 0), model2=Graph.out(ls[2], 0), ratio=0.66)
        model = Graph.out(b, 0)
    pos, neg = conditioning(g, "sd15")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=model, seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
               positive=pos, negative=neg, latent_image=Graph.out(lat), denoise=1.0)
    g.add("SaveLatent", samples=Graph.out(ks), filename_prefix="bench/latent")  # an output node
    return g, ks


def queue_to_first_step(client, g, ks, timeout=900):
    t0 = time.monotonic()
    pid = client.queue(g.prompt())
    while time.monotonic() - t0 < timeout:
        for e in client.events("progress"):
            d = e.get("data", {})
            if str(d.get("node")) == ks and d.get("prompt_id", pid) == pid:
                t = time.monotonic() - t0
                client.wait(pid)
                return t
        time.sleep(0.005)
    raise TimeoutError("no sampler progress")


def api_section(arch, repeats, kernels="eager", gram_cache="off", warm_up=True):
    from harness.server import FUSED_READY_LOG, ComfyServer, default_run_dir

    names = [p.name for p in family(arch)]
    srv = ComfyServer(default_run_dir(f"bench-{arch}-{kernels}-{gram_cache}"), [checkpoints.CHECKPOINTS],
                      env={KERNELS_ENV: kernels, CACHE_ENV: "1" if gram_cache == "on" else "0",
                           WARM_UP_ENV: "1" if warm_up else "0"})
    client = srv.start()
    client.listen()
    try:
        res = {}
        if kernels == "fused" and warm_up:  # as a user who queues once the server has compiled them
            res["warm-up"] = srv.wait_for_log(FUSED_READY_LOG)
        for kind in ("chain", "gm"):
            g, ks = _sampler_graph(names, kind, 0)
            # warm: loaders, first model load (and compiling the fused kernels when not warmed up);
            # reported as "first"
            res[f"first {kind}"] = queue_to_first_step(client, g, ks)
        for r in range(1, repeats + 1):
            for kind in ("chain", "gm"):
                g, ks = _sampler_graph(names, kind, r)
                res.setdefault(kind, []).append(queue_to_first_step(client, g, ks))
        return {k: v if isinstance(v, float) else statistics.median(v) for k, v in res.items()}, srv.host.kind
    finally:
        client.close()
        srv.stop()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self):
        self.peak = 0
        self._stop = False

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *a):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self):
        return self.peak - self.base


def read_once(tensors) -> None:
    """Read every byte of the tensors once and write nothing: the largest byte of each, any dtype
    (a sum with an fp32 accumulator runs at ~1 GB/s on fp16 on a CPU, memory speed on fp32; a
    byte max at memory speed on both). The floor of any pass over them."""
    import torch

    for t in tensors:
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()


def inprocess_section(arch, repeats, kernels=("eager",)):
    import torch

    from kernels.threads import intra_op_threads

    kernels = [kernels] if isinstance(kernels, str) else list(kernels)
    os.environ[KERNELS_ENV] = kernels[0]
    os.environ[CACHE_ENV] = "0"  # every call reads the inputs: node time vs one read
    from harness.host import import_in_process

    import_in_process()
    import comfy.model_management
    import comfy.sd
    from harness.server import gpu_host

    gpu = gpu_host()
    read_device = comfy.model_management.get_torch_device() if gpu else torch.device("cpu")

    from harness.loading import load_pack

    pack = load_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    out = {}
    with torch.inference_mode():
        models = [comfy.sd.load_checkpoint_guess_config(str(p), output_vae=False, output_clip=False)[0]
                  for p in family(arch) + [checkpoints.checkpoint(arch, seed=0)]]  # the last: their base
        base = models.pop()
        sd0 = models[0].model.diffusion_model.state_dict()
        one_model = sum(t.numel() * t.element_size() for t in sd0.values())
        params = sum(t.numel() for t in sd0.values())

        def weights():
            return [t for m in models for t in m.model.diffusion_model.state_dict().values()]

        def one_read():
            if not gpu:
                read_once(weights())
                return
            for t in weights():  # as ComfyUI's load: the stored dtype over the bus, cast on the GPU
                t.to(read_device).float()
            torch.cuda.synchronize()

        def fp32_copy():  # what ComfyUI's CPU load writes; not a floor (module docstring)
            for t in weights():
                t.to(dtype=torch.float32, copy=True)

        def one_read_pinned():  # the engine's own way onto a GPU (engine/staging.py)
            staging = pack.engine.staging
            move = staging.mover(read_device)
            for _, (t,) in staging.moved_groups([[t] for t in weights()], move):
                t.float()
            torch.cuda.synchronize()

        def one_read_1_thread():  # each op of the engine's CPU Gram pass runs on one thread
            with intra_op_threads(1):
                one_read()

        def node(cls, kernel=kernels[0], **kw):
            def run():
                os.environ[KERNELS_ENV] = kernel  # read at each CPU Gram pass
                return nodes[cls]().merge(model_1=models[0], model_2=models[1], model_3=models[2],
                                          weights="", device="auto" if gpu else "cpu", **kw)
            return run

        gm, karcher = "BarycenterGeometricMedian", "BarycenterKarcherMean"
        cases = {
            "one read, all threads": one_read,
            "one read, 1 thread": one_read_1_thread,
            **({"one read, through pinned buffers": one_read_pinned} if gpu else {"fp32 copy, all threads": fp32_copy}),
            "GM tensor": node(gm, tolerance=1e-7, **SOLVER),
            "GM block": node(gm, tolerance=1e-7, **{**SOLVER, "scope": "block"}),
            "GM model": node(gm, tolerance=1e-7, **{**SOLVER, "scope": "model"}),
            "Karcher tensor": node(karcher, tolerance=1e-7, max_iterations=100, scope="tensor"),
            "weighted mean": node("BarycenterWeightedMean"),
            # tensor methods: they write every merged tensor (3.4 GB fresh at SD1.5 shapes)
            "element median": node(gm, tolerance=1e-7, **{**SOLVER, "scope": "element"}),
            "sign-elected median": node("BarycenterSignElectedMedian", tolerance=1e-7, **SOLVER, base_model=base,
                                        strength=1.0, drop_rate=0.0, drop_seed=0),
        }
        for kernel in ([] if gpu else kernels[1:]):
            cases[f"GM tensor, {kernel} kernels"] = node(gm, kernel, tolerance=1e-7, **SOLVER)
            cases[f"Karcher tensor, {kernel} kernels"] = node(karcher, kernel, tolerance=1e-7, max_iterations=100,
                                                              scope="tensor")
            cases[f"sign-elected median, {kernel} kernels"] = node(
                "BarycenterSignElectedMedian", kernel, tolerance=1e-7, **SOLVER, base_model=base, strength=1.0,
                drop_rate=0.0, drop_seed=0)
        for name, fn in cases.items():
            fn()  # warm
            times, extras, vram = [], [], []
            for _ in range(repeats):
                gc.collect()
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    vram0 = torch.cuda.memory_allocated()
                with PeakRSS() as p:
                    t = time.perf_counter()
                    result = fn()
                    times.append(time.perf_counter() - t)
                del result
                extras.append(p.extra)
                if gpu:
                    vram.append(torch.cuda.max_memory_allocated() - vram0)
            out[name] = (min(times), max(extras), max(vram) if vram else None)
    os.environ[KERNELS_ENV] = kernels[0]
    return out, one_model, params, str(read_device)


def read_floor(res) -> float:
    """The fastest of the 'one read' cases of inprocess_section: what the node times are divided by."""
    return min(t for name, (t, _, _) in res.items() if name.startswith("one read"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sd15"], choices=["sd15", "sd15_full"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-api", action="store_true")
    ap.add_argument("--gram-cache", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help=f"API part: {CACHE_ENV} of the server (off: every GM prompt reads its inputs; "
                         f"on: a re-queued GM reuses the Grams)")
    ap.add_argument("--kernels", nargs="+", default=["eager"], choices=["eager", "fused"],
                    help=f"CPU Gram kernels ({KERNELS_ENV}): the API part starts a server per choice; the "
                         f"in-process part runs every node with the first and GM/Karcher with the others")
    ap.add_argument("--fused-warm-up", nargs="+", default=["on"], choices=["on", "off"],
                    help=f"API part, fused kernels ({WARM_UP_ENV}): on = compiled when the server starts, the "
                         f"first prompt queued once the log says they are ready; off = the first merge compiles")
    args = ap.parse_args(argv)
    print(f"# bench_host: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")
    for arch in args.arch:
        servers = [(k, c, w == "on") for k in args.kernels for c in args.gram_cache
                   for w in (args.fused_warm_up if k == "fused" else ["on"])]
        for kernels, cache, warm_up in ([] if args.skip_api else servers):
            q, host = api_section(arch, args.repeats, kernels, cache, warm_up)
            what = "Gram reused, a setting changed" if cache == "on" else "Gram cache off, inputs read every time"
            if kernels == "fused":
                what += (f"; compiled at startup, ready {q['warm-up']:.1f} s after the server answered"
                         if warm_up else "; compiled by the first merge")
            print(f"\n## {arch}: queue -> first sampler step ({host} ComfyUI, HTTP API, {kernels} CPU kernels, "
                  f"{what}; median of {args.repeats}; 'first' = the server's first prompt of that kind)")
            print(f"| merge | seconds | ratio to ModelMergeSimple chain |\n|---|---|---|")
            print(f"| 2x ModelMergeSimple | {q['chain']:.3f} | 1.00 |")
            print(f"| GeometricMedian of 3 (tensor) | {q['gm']:.3f} | {q['gm'] / q['chain']:.2f} |")
            print(f"| first: 2x ModelMergeSimple / GM | {q['first chain']:.3f} / {q['first gm']:.3f} | "
                  f"{q['first gm'] / q['first chain']:.2f} |")
        res, one_model, params, device = inprocess_section(arch, args.repeats, args.kernels)
        floor = read_floor(res)
        where = f"merge on {device}" if device != "cpu" else f"CPU, {args.kernels[0]} kernels unless named"
        print(f"\n## {arch}: node time and peak extra RAM, in-process, {where} "
              f"({params / 1e6:.1f}M params, one model {one_model / 2**20:.0f} MiB as loaded)")
        print("| case | seconds | ratio to the faster read | peak extra RSS | / one model | peak extra VRAM |\n"
              "|---|---|---|---|---|---|")
        for name, (t, extra, vram) in res.items():
            v = "" if vram is None else f"{vram / 2**20:.1f} MiB"
            print(f"| {name} | {t:.3f} | {t / floor:.2f} | {extra / 2**20:.1f} MiB | {100 * extra / one_model:.1f}% | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

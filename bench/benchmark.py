"""The benchmark: one command, one table, every figure measured in this run on this machine.

    .venv/bin/python -m bench.benchmark [--quick] [--write docs/benchmarks.md]

Sections (rows of the one table):
- kernels: 3 fine-tune-like SD1.5 UNets at real key shapes (bench/_shapes.py), fp16 storage, fp32
  compute, CPU, one thread (see bench_kernels.py on why). The floor is the fastest weighted-average
  pass the project can write over the same tensors (result in fp16), torch.compile'd when the
  fused kernels compile here; the "fused kernels" rows are the opt-in BARYCENTER_CPU_KERNELS=fused.
  Every method runs per scope: the Gram pass + solve is what a merge node does (a linear result goes to ComfyUI as patches);
  "+ combine" also writes the merged fp16 tensors. Element and sign-elected medians are tensor
  methods (they always write the tensors): the element median with equal weights and with weights
  1,2,3 (different code paths), the sign-elected one with and without a DARE drop, as the engine
  runs it (SignElectedGroup: the Grams of consecutive keys solved together) and, without a drop,
  one key at a time (a solve per key, as before 2026-11-24) and, with and without the drop, with
  the fused kernels. Peak RAM = extra RSS while the step runs.
- peers, on every 50th key (same tensors, equal weights): sd-mecha 1.1.8's geometric_median (in
  process) and mergekit 0.1.5's karcher (its own venv, .venv-peers), fp16 inputs, against ours.
- ComfyUI end to end (the PyPI snapshot, or COMFYUI_DIR): POST /prompt -> the KSampler's first
  step, a chain of two ModelMergeSimple vs our geometric median of the same 3 models, for tiny
  SD1.5 checkpoints and for real-shape SD1.5 checkpoints (bench_host.py); and in a ComfyUI
  process, the merge node's time vs one read of the three models as ComfyUI loaded them (every
  byte read once, nothing written: bench_host.read_once; on a GPU host, moved to the GPU). Both
  with the default kernels and, where they compile, the fused ones (a server of their own).
- memory: 3 SDXL UNets and 8 SD1.5 UNets at real shapes (fp16) merged by GM and Karcher
  (bench_memory.py): peak RSS against the inputs' size, time against one read of them.
--quick: a quarter of the keys, the tiny end-to-end case only, no SDXL memory run.
A CUDA section is added when torch sees a GPU: the kernel rows on the device and the Gram pass's
achieved bandwidth.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.sign_elected import GROUP_ELEMS, SignElectedGroup  # noqa: E402
from kernels.threads import intra_op_threads  # noqa: E402
from bench import bench_host, bench_kernels, bench_memory  # noqa: E402
from bench._shapes import checksum, synthetic_models, unet_shapes  # noqa: E402

GiB = 2 ** 30
MiB = 2 ** 20


class Table:
    def __init__(self):
        self.rows = []

    def add(self, section, case, seconds, floor=None, peer=None, ram=None, note=""):
        self.rows.append((section, case, seconds, floor, peer, ram, note))

    def markdown(self) -> str:
        out = ["| section | case | seconds | × floor | peer ÷ ours | peak RAM | notes |",
               "|---|---|---|---|---|---|---|"]
        for section, case, s, floor, peer, ram, note in self.rows:
            out.append(f"| {section} | {case} | {_f(s, 3)} | {_f(floor, 2)} | {_f(peer, 1, 'x')} | "
                       f"{ram or ''} | {note} |")
        return "\n".join(out)


def _f(x, digits, suffix=""):
    return "" if x is None else f"{x:.{digits}f}{suffix}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM, GPU: {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}; load average at start {os.getloadavg()[0]:.1f}")


def measured(fn, rounds):
    """(best seconds, peak extra RSS in bytes) over `rounds` runs."""
    best, peak = float("inf"), 0
    for _ in range(rounds):
        gc.collect()
        with bench_host.PeakRSS() as p:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        peak = max(peak, p.extra)
    return best, peak


def _ram(b):
    return f"{b / MiB:.0f} MiB"


def scoped_solve(grams, names, method, scope):
    units = kernels.scope_units(names, scope)
    unit_ids = torch.empty(len(names), dtype=torch.long)
    for u, idx in enumerate(units):
        unit_ids[idx] = u
    ug = torch.zeros((len(units),) + grams.shape[1:], dtype=grams.dtype).index_add_(0, unit_ids, grams)
    sol = kernels.solve(method, ug, None)
    return sol.coeffs[unit_ids]


def kernel_section(table, fraction, rounds, device="cpu"):
    shapes = unet_shapes("sd15")[::max(1, round(1 / fraction))]
    names = [k for k, _ in shapes]
    models = synthetic_models(shapes, 4, seed=0)  # 3 fine-tunes + a base (sign-elected median)
    dev = torch.device(device)
    keys = [[m[j].to(dev) for m in models[:3]] for j in range(len(shapes))]
    bases = [models[3][j].to(dev) for j in range(len(shapes))]
    del models
    params = sum(xs[0].numel() for xs in keys)
    w = [1 / 3] * 3
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def gram(full):
        gp = kernels.GramPass(len(keys), full=full, reread=lambda j: (keys[j], None))  # as the engine
        for j, xs in enumerate(keys):
            gp.add(j, xs, None, names[j])
        return gp.result()

    def linear(method, scope, combine):
        def run():
            coeffs = scoped_solve(gram(method != "geometric_median"), names, method, scope).tolist()
            if combine:
                for xs, row in zip(keys, coeffs):
                    kernels.combine(xs, row, dtype=xs[0].dtype)
            sync()
        return run

    def wa():
        for xs in keys:
            kernels.combine(xs, w, dtype=xs[0].dtype)
        sync()

    def element(weights=None):
        def run():
            for j, xs in enumerate(keys):
                kernels.element_median(xs, weights, key=names[j], out_dtype=xs[0].dtype)  # as the engine asks
            sync()
        return run

    def sign_elected(drop_rate=0.0, one_key_at_a_time=False):
        def run():  # as the engine: keys into a SignElectedGroup (their Grams solved a batch at a time)
            group = SignElectedGroup(3, drop_rate=drop_rate, budget=0 if one_key_at_a_time else GROUP_ELEMS)
            for j, xs in enumerate(keys):
                group.add(xs, bases[j], key=names[j], out_dtype=xs[0].dtype)
            group.finish()
            sync()
        return run

    section = f"kernels ({dev.type})"
    steps = [("weighted-average floor (fp16 out)", wa)]
    if dev.type == "cpu":
        steps.insert(0, ("weighted average, hand-written chunks", lambda: bench_kernels.wa_pivot(keys, w)))
    for method, label in (("geometric_median", "GM"), ("karcher", "Karcher")):
        for scope in ("tensor", "block", "model"):
            steps.append((f"{label} {scope}: Gram pass + solve", linear(method, scope, False)))
        steps.append((f"{label} tensor: + combine (fp16 out)", linear(method, "tensor", True)))
    steps += [("element median (GM element scope)", element()),
              ("element median, weights 1,2,3", element(kernels.parse_weights("1,2,3", 3))),
              ("sign-elected median (base, drop 0)", sign_elected()),
              ("sign-elected median (base, drop 0), one key at a time", sign_elected(one_key_at_a_time=True)),
              ("sign-elected median (base, drop 0.3)", sign_elected(0.3))]
    with intra_op_threads(1 if dev.type == "cpu" else None):
        fused_why = bench_kernels.fused_available(keys) if dev.type == "cpu" else "CPU only"
        if fused_why is None:  # opt-in fused kernels (BARYCENTER_CPU_KERNELS=fused), compiled here first
            bench_kernels.wa_fused(keys[:1], w)
            steps.insert(2, ("weighted average, fused (torch.compile)", lambda: bench_kernels.wa_fused(keys, w)))
            for method, label in (("geometric_median", "GM"), ("karcher", "Karcher")):
                steps.append((f"{label} tensor, fused kernels: Gram pass + solve",
                              bench_kernels.with_kernels("fused", linear(method, "tensor", False))))
            big = max(range(len(keys)), key=lambda j: keys[j][0].numel())

            def compile_sign_elected():  # here, not in the timed steps
                for drop_rate in (0.0, 0.3):
                    group = SignElectedGroup(3, drop_rate=drop_rate)
                    group.add(keys[big], bases[big], key=names[big], out_dtype=keys[big][0].dtype)
                    group.finish()

            bench_kernels.with_kernels("fused", compile_sign_elected)()
            steps.append(("sign-elected median (base, drop 0), fused kernels",
                          bench_kernels.with_kernels("fused", sign_elected())))
            steps.append(("sign-elected median (base, drop 0.3), fused kernels",
                          bench_kernels.with_kernels("fused", sign_elected(0.3))))
        elif dev.type == "cpu":
            table.add(section, "fused kernels", None, None, None, "", f"unavailable: {fused_why}")
        results = {name: measured(fn, rounds if "element" not in name and "sign" not in name else 1)
                   for name, fn in steps}
        floor = min(results[n][0] for n, _ in steps if n.startswith("weighted"))
        for name, (s, peak) in results.items():
            table.add(section, name, s, s / floor, None, _ram(peak))
        if dev.type == "cuda":
            nbytes = sum(x.numel() * x.element_size() for xs in keys for x in xs)
            s = min(measured(lambda: (gram(False), sync()), rounds)[0] for _ in range(1))
            table.add(section, "GM Gram pass: achieved read bandwidth", s, None, None, "",
                      f"{nbytes / s / 1e9:.0f} GB/s over {nbytes / GiB:.2f} GiB")
    return f"{len(shapes)} keys, {params / 1e6:.1f}M params × 3 models (+ base), fp16"


def peer_section(table, rounds, stride=50):
    shapes = unet_shapes("sd15")[::stride]
    models = synthetic_models(shapes, 3, seed=0)
    keys = [[m[j] for m in models] for j in range(len(shapes))]
    with intra_op_threads(1):
        ours_gm, _ = measured(lambda: bench_kernels.ours(keys, "geometric_median", full=False, combine=True), rounds)
        ours_k, _ = measured(lambda: bench_kernels.ours(keys, "karcher", full=True, combine=True), rounds)
        sm, sm_err = bench_kernels.sd_mecha_times(keys, (torch.float16,))
        mk, mk_err = bench_kernels.mergekit_times("sd15", stride, 3, 0, 1, (torch.float16,), checksum(models[0]))
    section = f"peers (every {stride}th key)"
    table.add(section, "ours: GM tensor + combine", ours_gm)
    if sm:
        s = sm[0]["float16"]
        table.add(section, "sd-mecha 1.1.8 geometric_median", s, None, s / ours_gm)
    else:
        table.add(section, "sd-mecha 1.1.8 geometric_median", None, note=sm_err)
    table.add(section, "ours: Karcher tensor + combine", ours_k)
    if mk:
        s = mk["seconds"]["float16"]
        table.add(section, f"mergekit {mk['version']} karcher", s, None, s / ours_k)
    else:
        table.add(section, "mergekit karcher", None, note=mk_err)


def host_sections(table, archs, rounds):
    """The ComfyUI rows; on a CPU host also with the fused kernels (BARYCENTER_CPU_KERNELS=fused)
    when they compiled in this process's kernel rows."""
    fused_ok = kernels.fused.failure() is None and not torch.cuda.is_available()
    for arch in archs:
        for choice, cache, what in (("eager", "off", "Gram read every time"),
                                    ("eager", "on", "a setting changed, Gram reused"),
                                    ("fused", "off", "Gram read every time"))[:3 if fused_ok else 2]:
            q, host = bench_host.api_section(arch, rounds, choice, gram_cache=cache)
            section = f"ComfyUI {host}, {arch}, HTTP API" + (", fused kernels" if choice == "fused" else "")
            table.add(section, "queue → first step: 2× ModelMergeSimple", q["chain"], 1.0)
            table.add(section, f"queue → first step: GeometricMedian of 3 ({what})", q["gm"], q["gm"] / q["chain"],
                      note="ratio to the ModelMergeSimple chain")
    arch = archs[-1]
    res, one_model, params, _ = bench_host.inprocess_section(arch, rounds, ("eager", "fused") if fused_ok else "eager")
    floor = bench_host.read_floor(res)
    section = f"ComfyUI process, {arch} ({params / 1e6:.0f}M params, {one_model / MiB:.0f} MiB a model)"
    for name, (s, extra, _) in res.items():
        table.add(section, name, s, s / floor, None, _ram(extra),
                  "floor: one read of the 3 models" if name.startswith("one read") else "")


def memory_section(table, configs):
    for name in configs:
        proc = subprocess.run([sys.executable, "-m", "bench.bench_memory", "--child", name], cwd=ROOT,
                              capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            last = (proc.stderr.strip().splitlines() or [""])[-1][-200:].replace("|", "/")
            table.add("memory", name, None, note=f"failed (rc {proc.returncode}): {last}")
            continue
        r = json.loads(found[-1][len("RESULT "):])
        section = f"memory, {r['models']}× {r['arch'].upper()} UNet ({r['inputs'] / GiB:.1f} GiB of inputs)"
        table.add(section, "one read of the inputs (1 thread)", r["read_s"], 1.0)
        for row in r["rows"]:
            table.add(section, f"{row['method']} tensor", row["seconds"], row["ratio_to_read"], None,
                      f"{row['peak_rss'] / GiB:.2f} GiB peak RSS ({row['peak_rss'] / r['inputs']:.2f}× inputs)",
                      f"+{row['extra'] / MiB:.0f} MiB during the merge; {row['converged']}/{row['units']} converged")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", help="also write the table, the machine and the command to this markdown file")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M")
    desc = machine()
    t0 = time.perf_counter()
    table = Table()
    # first, while this process holds nothing: 3 SDXL UNets need ~15 of this machine's 24 GiB
    memory_section(table, ["sd15x8"] if args.quick else ["sdxl3", "sd15x8"])
    data = kernel_section(table, 0.25 if args.quick else 1.0, args.rounds)
    if torch.cuda.is_available():
        kernel_section(table, 0.25 if args.quick else 1.0, args.rounds, device="cuda")
    gc.collect()
    peer_section(table, args.rounds)
    host_sections(table, ["sd15"] if args.quick else ["sd15", "sd15_full"], args.rounds)
    command = ".venv/bin/python -m bench.benchmark" + (" --quick" if args.quick else "")
    text = "\n".join([
        f"Measured {started} on {desc}; {time.perf_counter() - t0:.0f} s in all.",
        f"Kernel data: {data}. Command: `{command}`.",
        "", table.markdown()])
    print(text)
    if args.write:
        Path(args.write).write_text(bench_doc(text, command))
    return 0


def bench_doc(text: str, command: str) -> str:
    gpu = ("" if torch.cuda.is_available() else
           "\nNo GPU was lent to this run: the table has no CUDA rows. On a machine with one, the same "
           "command adds the kernel rows on the device and the Gram pass's achieved bandwidth.\n")
    return f"""# Benchmarks

Every figure below comes from one run of

    {command}

on the machine it names. Ratios are against a baseline measured in the same run (the machine is
shared, so absolute seconds move with its load; ratios much less). How each section is measured
is in the docstring of `bench/benchmark.py`.
{gpu}
{text}
"""


if __name__ == "__main__":
    sys.exit(main())

"""Timing runner for bench/bench_kernels.py: mergekit 0.1.5 `karcher_merge_tensors` on the
bench's synthetic models, regenerated here from the same seeds (same torch version).

Usage: <peers python> bench_mergekit_karcher.py KIND STRIDE N_MODELS SEED THREADS DTYPE...
Prints one JSON line: {"checksum": ..., "params": ..., "seconds": {dtype: s}, "version": ...}.
"""
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path


def main(argv):
    import torch
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from _shapes import checksum, synthetic_models, unet_shapes

    kind, stride, n, seed, threads = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
    torch.set_num_threads(threads)
    shapes = unet_shapes(kind)[::stride]
    models = synthetic_models(shapes, n, seed)
    out = {"checksum": checksum(models[0]), "params": sum(t.numel() for t in models[0]),
           "version": version("mergekit"), "seconds": {}}
    for name in argv[6:]:
        dt = getattr(torch, name)
        t0 = time.perf_counter()
        for j in range(len(shapes)):
            karcher_merge_tensors([m[j].to(dt) for m in models], [1.0 / n] * n)
        out["seconds"][name] = time.perf_counter() - t0
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

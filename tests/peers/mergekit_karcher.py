"""Runs mergekit 0.1.5's `karcher_merge_tensors` in .venv-peers (its pins clash with ComfyUI's).

Usage: <peers python> mergekit_karcher.py MAX_ITER TOL IN1 OUT1 [IN2 OUT2 ...]
Each IN holds tensors "x0".."x{N-1}" (and optionally "alphas", shape (N,); equal by default).
Each OUT gets "out". Prints the mergekit version. Exit code 3 if mergekit is not importable.
"""
import sys


def main(argv):
    try:
        import mergekit  # noqa: F401
        from mergekit.merge_methods.karcher import karcher_merge_tensors
    except Exception as e:  # report the real reason to the caller
        print(f"mergekit not importable: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    from importlib.metadata import version

    from safetensors.torch import load_file, save_file

    max_iter, tol = int(argv[1]), float(argv[2])
    files = argv[3:]
    for src, dst in zip(files[0::2], files[1::2]):
        data = load_file(src)
        n = sum(1 for k in data if k.startswith("x"))
        xs = [data[f"x{i}"] for i in range(n)]
        alphas = data["alphas"].tolist() if "alphas" in data else [1.0 / n] * n
        out = karcher_merge_tensors(xs, alphas, max_iter=max_iter, tol=tol)
        save_file({"out": out.contiguous()}, dst)
    print(f"mergekit {version('mergekit')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Against the peers themselves, equal weights: sd-mecha 1.1.8 `geometric_median` (in .venv) and
mergekit 0.1.5 `karcher_merge_tensors` (in .venv-peers, through a subprocess exchanging
safetensors files). A missing peer fails in CI (CI=true) and skips locally."""
from __future__ import annotations

import subprocess
import sys

import torch

from kernels import gram_matrix, solve
from tests.kernels.conftest import ROOT, missing_peer
from tests.kernels.kernels_ref import apply, gm_objective, rel

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RUNNER = ROOT / "tests" / "peers" / "mergekit_karcher.py"


def _cases(seed, offset):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, shape in ((3, (320, 64)), (4, (1280,)), (5, (40, 8, 3, 3)), (2, (77, 16))):
        c = offset * torch.randn(shape, generator=g, dtype=torch.float64)
        out.append([c + (0.3 + 0.2 * i) * torch.randn(shape, generator=g, dtype=torch.float64) for i in range(n)])
    return out


def _karcher_objective(xs, y):
    X = torch.stack([x.reshape(-1) for x in xs])
    keep = X.norm(dim=1) > 0
    U = X[keep] / X[keep].norm(dim=1, keepdim=True)
    u = y.reshape(-1) / y.norm()
    th = 2 * torch.asin(((U - u).norm(dim=1) / 2).clamp(max=1))
    return float((th ** 2).mean())


def test_geometric_median_matches_sd_mecha():
    try:
        from sd_mecha.extensions.builtin.merge_methods.ties import geometric_median
    except Exception as e:  # noqa: BLE001
        missing_peer(f"sd-mecha 1.1.8 not importable in {sys.executable}: {e}")
    for xs in _cases(0, offset=0.0) + _cases(1, offset=3.0):
        ref = geometric_median.__wrapped__(*xs, eps=1e-6, maxiter=100, ftol=1e-20)
        n = len(xs)
        sol = solve("geometric_median", gram_matrix(xs)[None], None, tol=1e-12, max_iter=1000)
        y = apply(sol.coeffs[0], xs).reshape(ref.shape)
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        o, oref = gm_objective(xs, w, y), gm_objective(xs, w, ref)
        assert abs(o - oref) <= 1e-6 * oref
        assert abs(float(sol.record["objective"][0]) - oref) <= 1e-6 * oref
        assert rel(y, ref) < 1e-5


def test_karcher_matches_mergekit(tmp_path):
    from safetensors.torch import load_file, save_file

    if not PEERS_PYTHON.exists():
        missing_peer(f"{PEERS_PYTHON} does not exist (bootstrap.sh builds .venv-peers with mergekit 0.1.5)")
    cases = _cases(2, offset=1.0)
    zero = _cases(3, offset=1.0)[0]
    zero.append(torch.zeros_like(zero[0]))  # a zero-norm input: out of the direction, in the magnitude
    cases.append(zero)
    args = []
    for j, xs in enumerate(cases):
        save_file({f"x{i}": x.contiguous() for i, x in enumerate(xs)}, tmp_path / f"in{j}.safetensors")
        args += [str(tmp_path / f"in{j}.safetensors"), str(tmp_path / f"out{j}.safetensors")]
    proc = subprocess.run([str(PEERS_PYTHON), str(RUNNER), "200", "1e-12", *args],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        missing_peer(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    assert "mergekit 0.1.5" in proc.stdout
    for j, xs in enumerate(cases):
        ref = load_file(tmp_path / f"out{j}.safetensors")["out"]
        sol = solve("karcher", gram_matrix(xs)[None], None, tol=1e-12, max_iter=200)
        y = apply(sol.coeffs[0], xs).reshape(ref.shape)
        assert rel(y, ref) < 1e-5, j
        o, oref = _karcher_objective(xs, y), _karcher_objective(xs, ref)
        assert abs(o - oref) <= 1e-6 * oref, j
        if j == len(cases) - 1:
            assert sol.record["excluded"][0].tolist() == [False, False, False, True]

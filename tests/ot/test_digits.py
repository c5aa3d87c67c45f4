"""OT fusion on real data that ships in a package: scikit-learn's `load_digits` (1797 8x8 images).

Setup (as DESIGN.md §3): 70/30 stratified split; for each pair the training part is cut into two
disjoint random halves and one MLP is trained on each half from a different seed (sklearn
MLPClassifier, adam, ReLU). Fusion goes through the same code path as for UNets: `mlp_spec` names
the hidden groups, `ot_fuse` aligns model_2 to model_1 and takes the mean.

Measured on the dev machine (2-core CPU, torch 2.13, sklearn 1.9), accuracy (%) on the 30% test
part, mean ± std over 5 pairs:

- MLP 64->32->10 (DESIGN's "MLP 64-32"; one hidden group): parents 96.3 / 96.1, plain average
  86.4 ± 4.0, OT exact 95.8 ± 0.5, OT Sinkhorn (eps 1e-3) 95.8 ± 0.5.
  (DESIGN.md: parents 96.6 / 96.0, plain 81.7 ± 5.6, OT exact 95.8 ± 0.6.)
- MLP 64->64->32->10 (two chained hidden groups, L2 0.1): parents 96.6 / 96.9, plain average
  66.3 ± 13.1, OT exact 95.2 ± 0.6.
- A 64-64-32-10 model trained on the whole training part (98.0) fused with a function-preserving
  permutation of itself: OT returns it exactly (98.0); plain averaging gives 68.1.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

from kernels.ot import mlp_spec, ot_fuse, permute_state_dict  # noqa: E402

PAIRS = 5


@pytest.fixture(scope="module")
def data():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def train(X, y, hidden, seed, alpha=1e-4, max_iter=300) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=max_iter, random_state=seed, alpha=alpha).fit(X, y)
    sd = {}
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        sd[f"l{i}.weight"] = torch.tensor(w.T, dtype=torch.float64)
        sd[f"l{i}.bias"] = torch.tensor(b, dtype=torch.float64)
    return sd


def accuracy(sd: dict, X, y) -> float:
    layers = len(sd) // 2
    h = torch.tensor(X)
    for i in range(layers):
        h = h @ sd[f"l{i}.weight"].T + sd[f"l{i}.bias"]
        if i < layers - 1:
            h = h.clamp_min(0)
    return 100.0 * float((h.argmax(1).numpy() == y).mean())


def run_pairs(data, hidden, alpha, solvers):
    Xtr, Xte, ytr, yte = data
    rows = []
    for p in range(PAIRS):
        idx = np.random.RandomState(100 + p).permutation(len(Xtr))
        halves = idx[: len(idx) // 2], idx[len(idx) // 2:]
        sds = [train(Xtr[h], ytr[h], hidden, seed=2 * p + j, alpha=alpha) for j, h in enumerate(halves)]
        shapes = {k: tuple(v.shape) for k, v in sds[0].items()}
        spec = mlp_spec(shapes, [f"l{i}" for i in range(len(hidden) + 1)])
        plain = {k: (sds[0][k] + sds[1][k]) / 2 for k in shapes}
        row = {"parent1": accuracy(sds[0], Xte, yte), "parent2": accuracy(sds[1], Xte, yte),
               "plain": accuracy(plain, Xte, yte)}
        for name, kw in solvers.items():
            fused, rep = ot_fuse(lambda i, k: sds[i][k], shapes, 2, spec=spec, **kw)
            assert fused["l0.weight"].dtype == torch.float64
            row[name] = accuracy(fused, Xte, yte)
        rows.append(row)
    return {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))) for k in rows[0]}


def _report(title, m):
    print(f"\n{title}: " + ", ".join(f"{k} {v[0]:.1f} ± {v[1]:.1f}" for k, v in m.items()))


def test_digits_ot_beats_plain_average_one_hidden_layer(data):
    m = run_pairs(data, (32,), 1e-4, {"ot_exact": {"solver": "exact"},
                                      "ot_sinkhorn": {"solver": "sinkhorn", "epsilon": 1e-3}})
    _report("digits MLP 64-32-10", m)
    parents = (m["parent1"][0] + m["parent2"][0]) / 2
    for name in ("ot_exact", "ot_sinkhorn"):
        assert m[name][0] >= m["plain"][0] + 5.0, (name, m)
        assert m[name][0] >= parents - 2.0, (name, m)


def test_digits_ot_beats_plain_average_two_hidden_layers(data):
    m = run_pairs(data, (64, 32), 0.1, {"ot_exact": {"solver": "exact"}})
    _report("digits MLP 64-64-32-10", m)
    parents = (m["parent1"][0] + m["parent2"][0]) / 2
    assert m["ot_exact"][0] >= m["plain"][0] + 5.0, m
    assert m["ot_exact"][0] >= parents - 2.0, m


def test_digits_permuted_copy_is_recovered(data):
    Xtr, Xte, ytr, yte = data
    sd = train(Xtr, ytr, (64, 32), seed=7)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    spec = mlp_spec(shapes, ["l0", "l1", "l2"])
    perm = permute_state_dict(sd, spec, seed=3)
    base = accuracy(sd, Xte, yte)
    assert accuracy(perm, Xte, yte) == base  # function-preserving
    assert any(not torch.equal(sd[k], perm[k]) for k in sd)
    fused, rep = ot_fuse(lambda i, k: (sd, perm)[i][k], shapes, 2, spec=spec)
    for k in sd:
        torch.testing.assert_close(fused[k], sd[k], rtol=0, atol=1e-12)
    plain = {k: (sd[k] + perm[k]) / 2 for k in sd}
    print(f"\ndigits permuted copy: model {base:.1f}, OT {accuracy(fused, Xte, yte):.1f}, "
          f"plain average {accuracy(plain, Xte, yte):.1f}")
    assert accuracy(plain, Xte, yte) < base - 2.0
    assert rep["alignment"]["model_2"]["distance_after"] < 1e-20

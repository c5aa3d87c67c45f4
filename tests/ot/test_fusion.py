"""OT fusion end to end on tiny models with ComfyUI's key names and shapes.

- A fused with a function-preserving permutation of A gives A back (exact solver, Sinkhorn at
  small eps, soft maps), while plain averaging of the same pair does not.
- Same-base models align to the identity (report 1.0) and OT fusion then equals the plain mean.
- N models, anchors, the three barycenters, rounds, progress/cancel, sink, report format.
"""
from __future__ import annotations

import json

import pytest
import torch

from ot_helpers import noisy, random_state_dict
from kernels.combine import combine
from kernels.ot import build_spec, ot_fuse, permute_state_dict


def reader(*sds):
    return lambda i, k: sds[i][k]


def max_err(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "clip"])
def test_permutation_recovery_exact(tiny_shapes, name):
    shapes = tiny_shapes[name]
    a = random_state_dict(shapes, seed=1)
    b = permute_state_dict(a, seed=2)
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(moved) > len(a) // 2
    fused, rep = ot_fuse(reader(a, b), shapes, 2, solver="exact")
    for k in a:
        assert torch.equal(fused[k], a[k]), k  # bit-exact: aligned copy == anchor, mean of equals
    m = rep["alignment"]["model_2"]
    assert m["distance_after"] == 0.0 and m["distance_before"] > 0
    assert m["identity_fraction"] < 0.2
    plain = {k: (a[k] + b[k]) / 2 for k in a}
    assert max_err(plain, a) > 0.1  # plain averaging of the same pair does not return A


def test_permutation_recovery_sinkhorn_small_eps(tiny_shapes):
    shapes = tiny_shapes["sd15"]
    a = random_state_dict(shapes, seed=3)
    b = permute_state_dict(a, seed=4)
    fused, rep = ot_fuse(reader(a, b), shapes, 2, solver="sinkhorn", epsilon=1e-3)
    for k in a:
        assert torch.equal(fused[k], a[k]), k
    errs = [g["models"]["model_2"]["marginal_error"] for g in rep["groups"]]
    iters = [g["models"]["model_2"]["iterations"] for g in rep["groups"]]
    assert max(errs) < 1e-5 and all(isinstance(i, int) and i > 0 for i in iters)


def test_permutation_recovery_soft_maps(tiny_shapes):
    shapes = tiny_shapes["clip"]
    a = random_state_dict(shapes, seed=5)
    b = permute_state_dict(a, seed=6)
    fused, rep = ot_fuse(reader(a, b), shapes, 2, solver="sinkhorn", epsilon=1e-3, soft=True)
    assert max_err(fused, a) < 1e-4
    fused, _ = ot_fuse(reader(a, b), shapes, 2, solver="exact", soft=True)
    assert max_err(fused, a) < 1e-6


def test_soft_maps_blur_at_large_eps(tiny_shapes):
    shapes = tiny_shapes["clip"]
    a = random_state_dict(shapes, seed=5)
    b = permute_state_dict(a, seed=6)
    fused, rep = ot_fuse(reader(a, b), shapes, 2, solver="sinkhorn", epsilon=0.5, soft=True)
    assert max_err(fused, a) > 1e-2  # soft maps at large eps average neighbouring units


@pytest.mark.parametrize("name", ["sd15", "clip"])
def test_same_base_aligns_to_identity_and_equals_mean(tiny_shapes, name):
    shapes = tiny_shapes[name]
    a = random_state_dict(shapes, seed=7)
    b, c = noisy(a, 8, 0.02), noisy(a, 9, 0.02)
    w = [0.5, 0.3, 0.2]
    fused, rep = ot_fuse(reader(a, b, c), shapes, 3, weights=w, solver="exact")
    for lab in ("model_2", "model_3"):
        assert rep["alignment"][lab]["identity_fraction"] == 1.0
        assert rep["alignment"][lab]["distance_after"] == rep["alignment"][lab]["distance_before"]
        assert all(g["models"][lab]["identity_fraction"] == 1.0 for g in rep["groups"])
    for k in a:
        assert torch.equal(fused[k], combine([a[k], b[k], c[k]], w)), k


def test_same_base_sinkhorn_identity(tiny_shapes):
    shapes = tiny_shapes["sdxl"]
    a = random_state_dict(shapes, seed=10)
    b = noisy(a, 11, 0.02)
    fused, rep = ot_fuse(reader(a, b), shapes, 2, solver="sinkhorn", epsilon=1e-3)
    assert rep["alignment"]["model_2"]["identity_fraction"] == 1.0
    for k in a:
        assert torch.equal(fused[k], combine([a[k], b[k]], [0.5, 0.5])), k


@pytest.mark.parametrize("barycenter", ["mean", "geometric_median", "karcher"])
def test_three_permuted_noisy_copies_any_anchor(tiny_shapes, barycenter):
    shapes = tiny_shapes["sd15"]
    a = random_state_dict(shapes, seed=12)
    b = permute_state_dict(noisy(a, 13, 0.01), seed=14)
    c = permute_state_dict(noisy(a, 15, 0.01), seed=16)
    ref = random_state_dict(shapes, seed=12)
    for anchor, models in ((0, (a, b, c)), (1, (b, a, c))):
        fused, rep = ot_fuse(reader(*models), shapes, 3, anchor=anchor, barycenter=barycenter)
        assert rep["anchor"] == f"model_{anchor + 1}" and rep["barycenter"] == barycenter
        if anchor == 0:
            # aligned to A: the barycenter of A and two 1%-noisy copies is within the noise of A
            for k in ref:
                scale = float(ref[k].abs().max())
                assert float((fused[k] - ref[k]).abs().max()) <= 0.05 * scale + 1e-6, k
        else:
            # aligned to B (a permutation of A): the result computes what B computes, so it is
            # a permutation of the anchor-0 result; compare distances instead of weights
            for lab in ("model_1", "model_3"):
                m = rep["alignment"][lab]
                assert m["distance_after"] < 1e-2 * m["distance_before"], (lab, m)


def test_rounds_do_not_increase_distance(tiny_shapes):
    shapes = tiny_shapes["sd15"]
    a = random_state_dict(shapes, seed=17)
    b = random_state_dict(shapes, seed=18)  # unrelated models
    d = {}
    for rounds in (1, 2):
        _, rep = ot_fuse(reader(a, b), shapes, 2, rounds=rounds)
        d[rounds] = rep["alignment"]["model_2"]["distance_after"]
        assert rep["rounds"] == rounds
    before = rep["alignment"]["model_2"]["distance_before"]
    assert d[1] < before and d[2] <= d[1] * (1 + 1e-6)


def test_progress_report_sink_and_cancel(tiny_shapes):
    shapes = tiny_shapes["clip"]
    a = random_state_dict(shapes, seed=19)
    b = permute_state_dict(a, seed=20)
    calls = []
    got = {}
    merged, rep = ot_fuse(reader(a, b), shapes, 2, progress=lambda d, t: calls.append((d, t)),
                          sink=lambda k, t: got.__setitem__(k, t), out_dtype=torch.float16)
    assert merged == {} and set(got) == set(shapes)
    assert all(v.dtype == torch.float16 for v in got.values())
    total = calls[-1][1]
    assert [d for d, _ in calls] == list(range(1, total + 1)) and total == len(build_spec(shapes).groups) + len(shapes)
    text = json.dumps(rep)
    back = json.loads(text)
    g = back["groups"][0]
    assert set(g["models"]["model_2"]) == {"identity_fraction", "cost_before", "cost_after", "iterations",
                                           "marginal_error", "certified_identity"}
    assert g["structure"]["kind"] in ("channels", "heads", "groupnorm", "geglu")
    heads = [g for g in back["groups"] if g["structure"]["kind"] == "heads"]
    assert heads and heads[0]["structure"]["heads"] == 2 and heads[0]["structure"]["head_dim"] == 64

    class Stop(Exception):
        pass

    def cancel(done, total):
        if done == 3:
            raise Stop()

    with pytest.raises(Stop):
        ot_fuse(reader(a, b), shapes, 2, progress=cancel)


def test_fp16_inputs_and_read_on_other_device(tiny_shapes):
    shapes = tiny_shapes["sd15"]
    a = random_state_dict(shapes, seed=21, dtype=torch.float16)
    b = permute_state_dict(a, seed=22)
    fused, rep = ot_fuse(reader(a, b), shapes, 2, device="cpu")
    for k in a:
        assert fused[k].dtype == torch.float16 and torch.equal(fused[k], a[k]), k


def test_identity_certificate_is_sound_and_used():
    """The exact solver skips the n×n cost matrix when a cheap bound proves the identity optimal.
    Whenever it says so, the full assignment agrees; near-identical models are certified."""
    from kernels.ot.fuse import _identity_certified, _Projections, _row_sqdist
    from kernels.ot.solvers import assign_exact

    proj = _Projections("cpu")
    g = torch.Generator().manual_seed(0)
    seen = {True: 0, False: 0}
    for trial in range(40):
        n, r = 64 + 16 * (trial % 4), 300 + 50 * (trial % 5)
        a = torch.randn(n, r, generator=g) * (1 + torch.rand(n, 1, generator=g))
        noise = [0.001, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0][trial % 7]
        b = a + noise * torch.randn(n, r, generator=g)
        if trial % 3 == 0:  # a few near-duplicate units make the bound tight
            a[1] = a[0] + 0.02 * torch.randn(r, generator=g)
            b[1] = a[1] + noise * torch.randn(r, generator=g)
        split = r // 3
        rows = [(a[:, :split], b[:, :split]), (a[:, split:], b[:, split:])]
        dsq = sum(_row_sqdist(x, y) for x, y in rows)
        cert = _identity_certified(rows, dsq, n, proj)
        seen[cert] += 1
        if cert:
            c = torch.cdist(a.double(), b.double()) ** 2
            perm = assign_exact(c)
            assert float(c.gather(1, perm[:, None]).sum()) == pytest.approx(float(c.diagonal().sum()), rel=1e-12)
    assert seen[True] >= 5 and seen[False] >= 5, seen


def test_certified_and_full_paths_agree(tiny_shapes):
    shapes = tiny_shapes["sd15"]
    a = random_state_dict(shapes, seed=23)
    b = noisy(a, 24, 0.02)
    f1, r1 = ot_fuse(reader(a, b), shapes, 2)
    f2, r2 = ot_fuse(reader(a, b), shapes, 2, certify=False)
    big = [g for g in r1["groups"] if (g["structure"]["kind"], g["size"]) in (("groupnorm", 128), ("geglu", 512))]
    assert big and all(g["models"]["model_2"]["certified_identity"] for g in big)  # small ones: solved
    assert not any(g["models"]["model_2"]["certified_identity"] for g in r2["groups"])
    assert r1["alignment"]["model_2"]["identity_fraction"] == r2["alignment"]["model_2"]["identity_fraction"] == 1.0
    for k in a:
        assert torch.equal(f1[k], f2[k])
    c = random_state_dict(shapes, seed=25)  # unrelated: never certified
    _, r3 = ot_fuse(reader(a, c), shapes, 2)
    assert not any(g["models"]["model_2"]["certified_identity"] for g in r3["groups"])


def test_linear_callback_keeps_unmoved_keys_lazy(tiny_shapes):
    shapes = tiny_shapes["sd15"]
    a = random_state_dict(shapes, seed=26)
    reads = []

    def read(i, k):
        reads.append((i, k))
        return (a, b)[i][k]

    b = noisy(a, 27, 0.02)  # same base: nothing moves, nothing is computed
    lin, out = {}, {}
    ot_fuse(read, shapes, 2, weights="1,3", distances=False, linear=lambda k, c: lin.__setitem__(k, c),
            sink=lambda k, t: out.__setitem__(k, t))
    assert set(lin) == set(shapes) and not out
    assert all(c == [0.25, 0.75] for c in lin.values())
    b = permute_state_dict(a, seed=28)  # permuted: grouped keys are computed, fixed ones stay lazy
    lin.clear()
    _, rep = ot_fuse(reader(a, b), shapes, 2, distances=False, linear=lambda k, c: lin.__setitem__(k, c),
                     sink=lambda k, t: out.__setitem__(k, t))
    spec = build_spec(shapes)
    assert set(lin) == set(spec.fixed) and set(out) == set(shapes) - set(spec.fixed)
    assert rep["alignment"]["model_2"]["distance_after"] is None
    assert {u["name"] for u in rep["units"] if u["moved"]} == set(out)


def test_permute_whole_checkpoint_layout(tiny_shapes):
    """permute_state_dict on a checkpoint-like dict: the UNet moves, VAE/CLIP keys stay as they are."""
    unet = {"model." + k: v for k, v in random_state_dict(tiny_shapes["sd15"], seed=29).items()}
    other = {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(16)}
    sd = {**unet, **other}
    p1 = permute_state_dict(sd, seed=30)
    assert set(p1) == set(sd)
    assert all(p1[k] is other[k] for k in other)
    assert sum(not torch.equal(p1[k], sd[k]) for k in unet) > len(unet) // 2
    p2 = permute_state_dict(sd, seed=30)
    assert all(torch.equal(p1[k], p2[k]) for k in sd)  # seeded


def test_bf16_cost_matmul_still_recovers(tiny_shapes):
    """cost_dtype=bfloat16 (2.5x faster matmuls on CPUs with AVX512-BF16) keeps exact recovery:
    the true match has cost 0, every other pair is O(‖a‖²) away."""
    shapes = tiny_shapes["sdxl"]
    a = random_state_dict(shapes, seed=31)
    b = permute_state_dict(a, seed=32)
    fused, _ = ot_fuse(reader(a, b), shapes, 2, cost_dtype=torch.bfloat16)
    assert all(torch.equal(fused[k], a[k]) for k in a)

"""GramPass (small keys batched on CPU) gives gram_matrix's Grams, and its checks."""
from __future__ import annotations

import pytest
import torch

from kernels import GramPass, MergeInputError, gram_matrix
from kernels.gram_pass import SMALL_KEY


def _keys(n_models, dtype, seed=0, base=False):
    """A model-like mix: many small keys (biases, norms), a few over SMALL_KEY, odd sizes."""
    g = torch.Generator().manual_seed(seed)
    sizes = [320, 7, 1280, 640 * 3, SMALL_KEY, SMALL_KEY + 1, 1, 320, 4096, 80_000, 5, 2560] * 3
    keys = []
    for s in sizes:
        ref = torch.randn(s, generator=g) * 0.05
        xs = [(ref + 1e-3 * torch.randn(s, generator=g)).to(dtype) for _ in range(n_models)]
        b = (ref + 1e-3 * torch.randn(s, generator=g)).to(dtype) if base else None
        keys.append((xs, b))
    return keys


def _pass(keys, full, workers=1):
    gp = GramPass(len(keys), full=full, workers=workers)
    for j, (xs, b) in enumerate(keys):
        gp.add(j, xs, b, f"k{j}")
    return gp.result()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_same_grams_as_per_key(dtype, full, base, n):
    keys = _keys(n, dtype, seed=n, base=base)
    got = _pass(keys, full)
    for j, (xs, b) in enumerate(keys):
        ref = gram_matrix(xs, b, full=full)
        # the centred block (what every solver uses) to fp32-product accuracy of its own scale
        assert _rel(got[j][1:, 1:], ref[1:, 1:]) < 1e-6, j
        assert _rel(got[j], ref) < 1e-6, j
        if not full:
            assert bool((got[j][0] == ref[0]).all())


def test_deterministic_and_identical_inputs_exact():
    keys = _keys(3, torch.float16)
    assert torch.equal(_pass(keys, True), _pass(keys, True))
    same = [([xs[0]] * 3, None) for xs, _ in keys]
    got = _pass(same, False)
    assert bool((got[:, 1:, 1:] == 0).all()), "identical inputs must give an exactly zero centred block"


def test_zero_point_made_exact_like_gram_matrix():
    keys = _keys(3, torch.float32)
    keys = [([xs[0], torch.zeros_like(xs[1]), xs[2]], None) for xs, _ in keys]
    got = _pass(keys, True)
    for j, (xs, b) in enumerate(keys):
        assert torch.equal(got[j], gram_matrix(xs, b, full=True)), "flagged keys are recomputed per key"


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("where", ["model", "base"])
def test_nonfinite_small_key_named(full, where):
    keys = _keys(3, torch.float16, base=True)
    xs, b = keys[3]
    assert xs[0].numel() <= SMALL_KEY
    if where == "model":
        xs[1] = xs[1].clone()
        xs[1][2] = float("nan")
        needle = "model_2"
    else:
        b = b.clone()
        b[0] = float("inf")
        needle = "base_model"
    keys[3] = (xs, b)
    with pytest.raises(MergeInputError, match=f"k3.*{needle}|{needle}.*k3"):
        _pass(keys, full)


@pytest.mark.parametrize("full", [True, False])
def test_threads_give_bit_identical_grams(full):
    keys = _keys(3, torch.float16, seed=7, base=True)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(_pass(keys, full, workers=3), _pass(keys, full, workers=1))
    finally:
        torch.set_num_threads(old)


def test_threads_raise_the_same_error_as_one_thread():
    keys = _keys(3, torch.float32)
    for j in (2, 9):  # a small key (batched, done at the flush) and a large one (done at once)
        xs, b = keys[j]
        xs[2] = xs[2].clone()
        xs[2].view(-1)[0] = float("inf")
    messages = []
    for workers in (1, 4):
        with pytest.raises(MergeInputError, match="model_3 contains Inf") as e:
            _pass(keys, True, workers=workers)
        messages.append(str(e.value))
    assert messages[0] == messages[1]

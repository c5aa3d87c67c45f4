"""DARE drop masks (kernels/dare.py): the hash's bits against Python integers, independence from
the chunking, the keep probability and the independence of the draws."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import MergeInputError
from kernels.dare import M32, DropMask, keep_scale, lowbias32_, stream_constants, threshold


def lowbias32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def draw_int(key_seed: int, i: int, k: int) -> int:
    a, c = stream_constants(key_seed, i + 1)[i]
    return lowbias32_int((a * k + c) & M32) ^ (1 << 31)


def test_hash_bits_equal_python_integers():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(1 << 31), 1 << 31, (20000,), generator=g, dtype=torch.int64)
    words = torch.cat([words, torch.tensor([0, 1, -1, (1 << 31) - 1, -(1 << 31)])])
    x = words.to(torch.int32)
    lowbias32_(x, torch.empty_like(x))
    expected = [lowbias32_int(int(w) & M32) for w in words]
    assert [int(v) & M32 for v in x] == expected  # int32 products wrap mod 2^32


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.97])
def test_masks_equal_python_draws(p):
    n, numel, seed = 3, (1 << 31) - 1, 987654321
    drop = DropMask(p, seed, n, numel, "cpu")
    t = threshold(p)
    for a in (0, 12345, numel - 300):  # the largest indices overflow a_i·k in int32
        out = drop.keep(a, a + 300, torch.empty(n, 300))
        ref = [[float(draw_int(seed, i, k) >= t) for k in range(a, a + 300)] for i in range(n)]
        assert out.tolist() == ref, a


def test_masks_do_not_depend_on_the_chunking():
    n, numel = 4, 3 << 20  # the whole key hashes row by row (HASH_ELEMENTS), the pieces all rows at once
    drop = DropMask(0.4, 42, n, numel, "cpu")
    whole = drop.keep(0, numel, torch.empty(n, numel)).clone()
    cuts = [0, 1, 999, 1000, 65536, 70001, 1 << 21, numel]
    parts = [drop.keep(a, e, torch.empty(n, e - a)).clone() for a, e in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts, 1), whole)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_probability_and_independent_draws(p):
    n, numel = 4, 1 << 20
    m = DropMask(p, 7, n, numel, "cpu").keep(0, numel, torch.empty(n, numel, dtype=torch.float64))
    q = 1 - threshold(p) / 2 ** 32
    sd = math.sqrt(q * (1 - q) / numel)
    assert float((m.mean(1) - q).abs().max()) < 5 * sd
    z = (m - q) / math.sqrt(q * (1 - q))  # unit variance; a correlation's sd is 1/sqrt(count)
    for i in range(n):
        for j in range(i + 1, n):
            assert abs(float((z[i] * z[j]).mean())) < 5 / math.sqrt(numel), (i, j)
        for lag in (1, 2, 3, 320, 1024, 4096):  # neighbours and the rows of typical weights
            assert abs(float((z[i, lag:] * z[i, :-lag]).mean())) < 5 / math.sqrt(numel - lag), (i, lag)
    other = DropMask(p, 8, n, numel, "cpu").keep(0, numel, torch.empty(n, numel, dtype=torch.float64))
    assert abs(float((z[0] * (other[0] - q)).mean() / math.sqrt(q * (1 - q)))) < 5 / math.sqrt(numel)


def test_thresholds_and_scale_at_the_edges():
    assert threshold(0.0) == 0 and keep_scale(0.0) == 1.0
    m = DropMask(0.0, 1, 2, 5000, "cpu").keep(0, 5000, torch.empty(2, 5000))
    assert bool((m == 1).all())  # nothing dropped at p = 0
    assert threshold(1 - 2 ** -40) == M32 and math.isfinite(keep_scale(1 - 2 ** -40))
    assert keep_scale(0.25) == 4 / 3  # T = 2^30 exactly: q = 3/4
    with pytest.raises(MergeInputError, match="2\\^31 elements"):
        DropMask(0.1, 1, 2, (1 << 31) + 1, "cpu")

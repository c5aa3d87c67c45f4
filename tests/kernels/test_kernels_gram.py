"""gram_matrix: definition, chunking, dtypes, summing over keys, exact zeros and identical inputs."""
from __future__ import annotations

import pytest
import torch

from kernels import gram_matrix, pairwise_distances, point_norms
from tests.kernels.kernels_ref import direct_gram

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def _models(n=3, shape=(37, 29), spread=0.05, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return [(base + spread * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(n)], base


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13])
def test_matches_definition_fp64(n):
    xs, base = _models(n)
    for b in (None, base):
        ref = direct_gram(xs, b)
        got = gram_matrix(xs, b)
        assert got.dtype == torch.float64 and got.shape == (n + 1, n + 1)
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 20])
def test_chunking_does_not_change_it(chunk):
    xs, base = _models(4)
    ref = direct_gram(xs, base)
    got = gram_matrix(xs, base, chunk_elems=chunk)
    assert torch.allclose(got, ref, rtol=1e-11, atol=1e-11 * float(ref.abs().max()))


@pytest.mark.parametrize("n", [3, 9])  # the CPU products in bands of rows (gram.cpu_band): 1 row (3), 4 rows (9)
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_inputs_centred_accuracy(dtype, n):
    """Any float storage: the Gram of the stored values (upcast exactly) to fp32 accuracy, the
    centred block (distances) included, although the models are nearly identical."""
    xs, base = _models(n, shape=(300, 200), spread=0.01)
    xs = [x.to(dtype) for x in xs]
    ref = direct_gram(xs)
    got = gram_matrix(xs)
    cref, cgot = ref[1:, 1:], got[1:, 1:]
    assert float((cgot - cref).abs().max() / cref.abs().max()) < 2e-6
    dref = pairwise_distances(ref)
    dgot = pairwise_distances(got)
    assert float(((dgot - dref).abs() / (dref + torch.eye(n))).max()) < 2e-6
    assert _scaled_err(got, ref) < 2e-6


def _scaled_err(got, ref):
    """max |error_ij| / sqrt(ref_ii ref_jj): entry errors on the scale of the vectors' norms."""
    d = ref.diagonal().clamp_min(1e-300).sqrt()
    return float(((got - ref).abs() / (d[:, None] * d[None, :])).max())


def test_sum_over_keys_is_gram_of_concatenation():
    a, _ = _models(3, shape=(10, 11), seed=1)
    b, _ = _models(3, shape=(7,), seed=2)
    cat = [torch.cat([x.reshape(-1), y.reshape(-1)]) for x, y in zip(a, b)]
    assert torch.allclose(gram_matrix(a) + gram_matrix(b), gram_matrix(cat), rtol=1e-12, atol=1e-12)


def test_identical_inputs_give_exact_zero_centred_block():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(1000, 3).to(dtype)
        g = gram_matrix([x, x.clone(), x.clone()])
        assert torch.count_nonzero(g[1:, 1:]) == 0
        assert torch.count_nonzero(g[0, 1:]) == 0
        b = torch.randn(1000, 3).to(dtype)
        g = gram_matrix([x, x.clone()], b)
        assert torch.count_nonzero(g[1:, 1:]) == 0


def test_exact_zero_points_have_exact_zero_norm():
    """A task vector that is exactly 0 (model == base) must not get a spurious norm from
    cancellation, whichever position it has."""
    for dtype in (torch.float32, torch.float16):
        xs, base = _models(4, shape=(513, 257), spread=0.3, seed=5)
        base = base.to(dtype)
        xs = [x.to(dtype) for x in xs]
        for zero_at in range(4):
            ys = list(xs)
            ys[zero_at] = base.clone()
            norms = point_norms(gram_matrix(ys, base))
            others = [i for i in range(4) if i != zero_at]
            assert float(norms[zero_at]) <= 1e-7 * float(norms[others].max())
            ref = point_norms(direct_gram(ys, base))
            assert torch.allclose(norms[others], ref[others], rtol=1e-6)


def test_on_input_device_and_empty():
    xs, _ = _models(2)
    assert gram_matrix(xs).device == xs[0].device
    e = [torch.empty(0, 3), torch.empty(0, 3)]
    assert torch.equal(gram_matrix(e), torch.zeros(3, 3, dtype=torch.float64))


def test_memory_is_chunked():
    """A 'huge' key: only chunk-sized buffers; compare result with a whole-tensor fp64 Gram."""
    xs, _ = _models(3, shape=(1 << 20,), spread=0.1, seed=3, dtype=torch.float16)
    got = gram_matrix(xs, chunk_elems=1 << 16)
    ref = direct_gram(xs)
    assert _scaled_err(got, ref) < 2e-6


@pytest.mark.parametrize("n,with_base", [(3, False), (3, True), (4, False), (5, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_default_chunks_accuracy(n, with_base, dtype):
    """A key over several default CPU chunks (2^19 elements up to 4 rows, 2^18 above: gram_chunk,
    512 or 256 sub-block products summed per chunk) keeps fp32 accuracy on nearly identical models."""
    from kernels.gram import gram_chunk

    numel = 3 * (1 << 19) + 4099
    xs, base = _models(n, shape=(numel,), spread=0.01, seed=n, dtype=dtype)
    b = base.to(dtype) if with_base else None
    assert gram_chunk("cpu", n + with_base) == (1 << 19 if n + with_base <= 4 else 1 << 18)
    got = gram_matrix(xs, b)
    ref = direct_gram(xs, b)
    assert _scaled_err(got, ref) < 2e-6
    cref, cgot = ref[1:, 1:], got[1:, 1:]
    assert float((cgot - cref).abs().max() / cref.abs().max()) < 2e-6


def test_centred_only_gram():
    """full=False: the centred block only (geometric median, distances); Karcher refuses it."""
    from kernels import MergeInputError, solve

    xs, base = _models(4, dtype=torch.float16)
    full = gram_matrix(xs, base)
    part = gram_matrix(xs, base, full=False)
    assert torch.equal(part[1:, 1:], full[1:, 1:])
    assert float(part[0, 0]) == -1.0 and torch.count_nonzero(part[0, 1:]) == 0
    assert torch.equal(solve("geometric_median", part[None], None).coeffs,
                       solve("geometric_median", full[None], None).coeffs)
    with pytest.raises(MergeInputError, match="full=True"):
        solve("karcher", (part + part)[None], None)
    bad = base.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(MergeInputError, match="base_model contains NaN"):
        gram_matrix(xs, bad, full=False)

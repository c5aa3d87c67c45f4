"""Bad input is refused with messages that name the key, the model and the value."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import (MergeInputError, check_inputs, combine, element_median, gram_matrix, parse_weights,
                     sign_elected_median, solve)


def test_mismatched_shapes_name_key_models_and_shapes():
    xs = [torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3, 4)]
    with pytest.raises(MergeInputError) as e:
        check_inputs("diffusion_model.out.2.weight", xs)
    msg = str(e.value)
    assert "diffusion_model.out.2.weight" in msg and "model_3" in msg and "model_1" in msg
    assert "[3, 4]" in msg and "[4, 3]" in msg
    with pytest.raises(MergeInputError, match=r"base_model.*\[5\].*model_1.*\[4, 3\]"):
        check_inputs("k", xs[:2], torch.zeros(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("bad,kind", [(math.nan, "NaN"), (math.inf, "Inf")])
def test_nan_inf_name_model_index_and_key(dtype, bad, kind):
    if dtype == torch.float8_e4m3fn and kind == "Inf":
        pytest.skip("float8_e4m3fn has no infinity (it saturates to NaN)")
    xs = [torch.randn(10, 10).to(dtype) for _ in range(3)]
    xs[2] = xs[2].clone()
    xs[2].view(-1)[17] = torch.tensor(bad).to(dtype)
    with pytest.raises(MergeInputError, match=rf"key 'clip_l.k'.*model_3.*{kind}"):
        check_inputs("clip_l.k", xs)
    # the Gram pass finds it too, without a separate scan
    with pytest.raises(MergeInputError, match=rf"key 'clip_l.k'.*model_3.*{kind}"):
        gram_matrix(xs, key="clip_l.k")
    base = torch.zeros(10, 10).to(dtype)
    base.view(-1)[3] = torch.tensor(bad).to(dtype)
    with pytest.raises(MergeInputError, match=rf"base_model.*{kind}"):
        check_inputs("k", xs[:2], base)
    with pytest.raises(MergeInputError, match=rf"base_model.*{kind}"):
        gram_matrix(xs[:2], base, key="k")


def test_non_float_and_empty_refused():
    with pytest.raises(MergeInputError, match="int64"):
        check_inputs("k", [torch.zeros(3, dtype=torch.long), torch.zeros(3)])
    with pytest.raises(MergeInputError, match="no input"):
        check_inputs("k", [])
    check_inputs("k", [torch.zeros(3), torch.zeros(3, dtype=torch.float16)])  # mixed floats are fine


@pytest.mark.parametrize("w,n,msg", [
    ([1, 2], 3, "2 weights for 3 models"),
    ("1, 2, x", 3, "'x', not a number"),
    ([1, -0.5, 1], 3, "model_2 is -0.5.*>= 0"),
    ([0, 0, 0], 3, "all weights are zero"),
    ([1, math.nan, 1], 3, "model_2 is nan"),
    ([1, math.inf, 1], 3, "model_2 is inf"),
    ("1;;2 3 4", 3, "4 weights for 3"),
])
def test_bad_weights_refused(w, n, msg):
    with pytest.raises(MergeInputError, match=msg):
        parse_weights(w, n)


def test_weights_parsed_and_normalised():
    assert parse_weights(None, 4).tolist() == [0.25] * 4
    assert parse_weights("", 2).tolist() == [0.5, 0.5]
    assert parse_weights("  ", 2).tolist() == [0.5, 0.5]
    w = parse_weights("1, 3 ;0", 3)
    assert w.dtype == torch.float64 and w.tolist() == [0.25, 0.75, 0.0]
    assert parse_weights(torch.tensor([2.0, 2.0]), 2).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("method", ["geometric_median", "karcher"])
@pytest.mark.parametrize("params,msg", [
    ({"eps": 0}, "eps must be > 0"), ({"eps": -1e-3}, "eps must be > 0"),
    ({"tol": -1.0}, "tol must be >= 0"), ({"max_iter": -1}, "max_iter must be a whole number"),
    ({"max_iter": 2.5}, "max_iter"), ({"eps": "small"}, "eps must be a number"),
    ({"eps": math.nan}, "eps must be finite"), ({"tolerance": 1e-3}, "unknown parameter"),
])
def test_bad_solver_params_refused(method, params, msg):
    g = gram_matrix([torch.randn(5), torch.randn(5)])[None]
    with pytest.raises(MergeInputError, match=msg):
        solve(method, g, None, **params)


def test_bad_weights_refused_by_solvers_and_tensor_methods():
    xs = [torch.randn(5), torch.randn(5)]
    g = gram_matrix(xs)[None]
    for w in ([-1, 2], [0, 0], [1, 2, 3]):
        with pytest.raises(MergeInputError):
            solve("geometric_median", g, torch.tensor(w, dtype=torch.float64))
        with pytest.raises(MergeInputError):
            element_median(xs, torch.tensor(w, dtype=torch.float64))
    with pytest.raises(MergeInputError, match="base"):
        sign_elected_median(xs, None)
    with pytest.raises(MergeInputError, match="drop_rate"):
        sign_elected_median(xs, xs[0], drop_rate=1.0)
    with pytest.raises(MergeInputError, match="eps must be > 0"):
        sign_elected_median(xs, xs[0], eps=0.0)
    with pytest.raises(MergeInputError, match="seed"):
        sign_elected_median(xs, xs[0], seed="abc")
    with pytest.raises(MergeInputError, match="unknown merge method"):
        solve("median_of_means", g, None)
    with pytest.raises(MergeInputError, match="tensor per key"):
        solve("element_median", g, None)
    with pytest.raises(MergeInputError, match="2 coefficients for 3"):
        combine(xs + [xs[0]], [0.5, 0.5])

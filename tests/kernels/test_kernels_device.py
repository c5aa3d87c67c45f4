"""Same results on CPU and CUDA (runs where a GPU exists), determinism on one device, and the
CI behaviour of a missing peer."""
from __future__ import annotations

import pytest
import torch

import tests.kernels.conftest as kconf
from kernels import (combine, element_median, gram_matrix, parse_weights, sign_elected_median, solve,
                     task_vector_coefficients)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _models(dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(640, 320, generator=g)
    xs = [(base + 0.02 * torch.randn(640, 320, generator=g)).to(dtype) for _ in range(3)]
    return [x.to(device) for x in xs], base.to(dtype).to(device)


def _merge_all(xs, base):
    w = parse_weights("1 2 3", 3)
    out = {}
    for method in ("weighted_mean", "geometric_median", "karcher"):
        g = gram_matrix(xs, base)
        sol = solve(method, g[None], w.to(g.device))
        a, ab = task_vector_coefficients(sol.coeffs, 0.8)
        out[method] = (sol.coeffs.cpu(), combine(xs, a[0], base, ab[0], dtype=torch.float32).cpu())
    out["element"] = (None, element_median(xs, w, base).cpu())
    out["sign"] = (None, sign_elected_median(xs, base, w)[0].cpu())
    out["sign, drop 0.3"] = (None, sign_elected_median(xs, base, w, drop_rate=0.3, seed=5, key="k")[0].cpu())
    return out


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_short_point_gram_in_fp64_equals_the_cpu_one(dtype):
    """A task vector 1000x shorter than the others: its key is recomputed in fp64 (gram.py,
    "Norms") on the device too; both devices then agree far below fp32's 1e-7."""
    xs, base = _models(torch.float64)
    xs[1] = base + 1e-3 * (xs[1] - base)
    xs, base = [x.to(dtype) for x in xs], base.to(dtype)
    cpu = gram_matrix(xs, base)
    gpu = gram_matrix([x.cuda() for x in xs], base.cuda()).cpu()
    assert float((cpu - gpu).abs().max()) <= 1e-12 * float(cpu.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_inputs_same_device_bit_identical(dtype):
    xs, base = _models(dtype)
    a, b = _merge_all(xs, base), _merge_all(xs, base)
    for k in a:
        assert a[k][0] is None or torch.equal(a[k][0], b[k][0])
        assert torch.equal(a[k][1], b[k][1]), k


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_and_cuda_agree(dtype):
    cpu = _merge_all(*_models(dtype, "cpu"))
    gpu = _merge_all(*_models(dtype, "cuda"))
    for k in cpu:
        if cpu[k][0] is not None:
            assert torch.allclose(cpu[k][0], gpu[k][0], rtol=1e-5, atol=1e-7), k
        scale = float(cpu[k][1].abs().max())
        assert float((cpu[k][1] - gpu[k][1]).abs().max()) <= 1e-5 * scale, k
    assert torch.equal(cpu["element"][1], gpu["element"][1])


@pytest.mark.cuda
@needs_cuda
def test_cuda_drop_masks_equal_the_cpu_masks():
    from kernels.dare import DropMask

    masks = [DropMask(0.3, 99, 3, 1 << 22, dev).keep(5, (1 << 22) - 7, torch.empty(3, (1 << 22) - 12, device=dev))
             for dev in ("cpu", "cuda")]
    assert torch.equal(masks[0], masks[1].cpu())
    xs, base = _models(torch.float16, "cuda")
    state = torch.cuda.get_rng_state()
    a, ra = sign_elected_median(xs, base, drop_rate=0.3, seed=5, key="k")
    b, _ = sign_elected_median(xs, base, drop_rate=0.3, seed=5, key="k")
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    _, rc = sign_elected_median(*_models(torch.float16, "cpu"), drop_rate=0.3, seed=5, key="k")
    # the same masks; only an entry whose weighted sum rounds to the other sign may be elected apart
    assert max(abs(x - y) for x, y in zip(ra["kept_fraction"], rc["kept_fraction"])) < 1e-4


def test_missing_peer_fails_in_ci_and_skips_locally(monkeypatch):
    monkeypatch.setattr(kconf, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="peer reference missing in CI"):
        kconf.missing_peer("no .venv-peers")
    monkeypatch.setattr(kconf, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="no .venv-peers"):
        kconf.missing_peer("no .venv-peers")


def _staging():
    from harness.loading import load_file

    return load_file("engine/staging.py", "barycenter_staging")  # torch only, no ComfyUI


def test_no_pinned_mover_for_the_cpu():
    assert _staging().mover(torch.device("cpu")) is None


@pytest.mark.cuda
@needs_cuda
def test_pinned_mover_copies_every_byte():
    staging = _staging()
    move = staging.mover(torch.device("cuda"))
    assert move is not None
    g = torch.Generator().manual_seed(1)
    big = staging.PIECE // 2 * 5 + 3  # fp16 elements: 2.5 pieces and a bit
    tensors = [torch.randn(big, generator=g).half(), torch.randn(()), torch.randn(7, 5, generator=g).bfloat16(),
               torch.randn(3000, generator=g).to(torch.float8_e4m3fn), torch.randn(64, 64, generator=g).T,
               torch.randn(staging.PIECE // 4, generator=g)]
    tensors = tensors * 3  # the ring wraps around several times while earlier copies may be in flight
    moved = [move(t) for t in tensors] + move.many(tensors)  # one by one, then packed into pieces
    for t, m in zip(tensors + tensors, moved):
        assert m.device.type == "cuda" and m.dtype == t.dtype and m.shape == t.shape
        assert torch.equal(m.cpu().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else m.cpu(),
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)


@pytest.mark.cuda
@needs_cuda
def test_moved_tensors_ready_in_the_callers_stream_order():
    """The copies run on the mover's own stream: whatever the caller's stream queues after a move
    (here sums queued without any sync, on the default stream and on a side stream) sees every
    byte, also when the caller's stream is busy and the moved tensors' memory is freed and reused."""
    staging = _staging()
    move = staging.mover(torch.device("cuda"))
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(staging.PIECE // 2 + 17, generator=g), torch.randn(1000, generator=g).half(),
               torch.randn(staging.PIECE // 8, generator=g).bfloat16()] * 4
    expected = torch.stack([t.double().sum() for t in tensors])
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            for _ in range(3):
                torch.cuda._sleep(2_000_000)  # the caller's stream busy: the copy stream runs ahead
                sums = torch.stack([m.double().sum() for m in move.many(tensors)])
                sums2 = torch.stack([move(t).double().sum() for t in tensors])
                for got in (sums, sums2):  # a missed wait reads stale or half-copied bytes: far off
                    assert torch.allclose(got.cpu(), expected, rtol=1e-12, atol=1e-9)


@pytest.mark.cuda
@needs_cuda
def test_mover_holds_a_bounded_number_of_pieces_when_the_gpu_lags():
    """While the caller's stream is stalled, moving 64 pieces (1 GiB) and dropping each one after
    queueing its use must not fill the GPU with all of them: the copies wait for the caller's
    stream LAG pieces back and the CPU for the ring, so about LAG + PIECES pieces are held.
    Measured as reserved memory: a dropped piece whose use the stalled stream has not reached
    leaves torch's allocated count at once but stays reserved (not reusable) until then."""
    staging = _staging()
    move = staging.mover(torch.device("cuda"))
    pieces = [torch.full((staging.PIECE // 4,), float(i)) for i in range(64)]  # fp32: one piece each
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    torch.cuda._sleep(2_000_000_000)  # the caller's stream stalled ~1 s: longer than the CPU needs for 64 pieces
    for p in pieces:
        total += move(p).double().sum()
    assert float(total) == sum(float(i) * p.numel() for i, p in enumerate(pieces))
    held = torch.cuda.max_memory_reserved() - before
    # the pieces in flight, and a few of the sums' fp64 copies (2 pieces each; the caller's stream
    # reuses its own freed blocks in order); without the bound all 64 pieces: 1 GiB
    assert held <= (staging.LAG + staging.PIECES + 2 + 4 * 2) * staging.PIECE, held

"""GramPass (small keys batched on CPU) gives gram_matrix's Grams, and its checks."""
from __future__ import annotations

import pytest
import torch

from kernels import GramPass, MergeInputError, gram_matrix
from kernels.gram_pass import SMALL_KEY
from kernels.threads import intra_op_threads
from tests.kernels.kernels_ref import direct_gram


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


def _pass(keys, full, workers=1, held=True):
    gp = GramPass(len(keys), full=full, workers=workers)
    for j, (xs, b) in enumerate(keys):
        gp.add(j, xs, b, f"k{j}", held=held)
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
@pytest.mark.parametrize("size", [320, 80_000])  # a small key, a medium one
def test_batched_key_with_overflowing_products_rescaled_quietly(full, size):
    """fp32 products of a batched key overflow (inf - inf = nan in its batch sums): the key is
    flagged and recomputed like gram_matrix, with no RuntimeWarning (pytest.ini makes one fail);
    the keys batched with it keep their own Grams."""
    keys = _keys(3, torch.float32, seed=4)
    j = next(i for i, (xs, _) in enumerate(keys) if xs[0].numel() == size)
    keys[j] = ([x * 2.0 ** 80 for x in keys[j][0]], None)  # the differences overflow too
    got = _pass(keys, full)
    ref = gram_matrix([x.double() for x in keys[j][0]], None, full=full)
    assert bool(torch.isfinite(got[j]).all())
    assert _rel(got[j][1:, 1:], ref[1:, 1:]) < 1e-6
    for i, (xs, b) in enumerate(keys):
        if i != j:
            assert _rel(got[i][1:, 1:], gram_matrix(xs, b, full=full)[1:, 1:]) < 1e-6, i


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("reread", [False, True])
def test_medium_keys_batched_per_kind(monkeypatch, full, base, reread):
    """Keys above SMALL_KEY within one chunk go through medium batches; keys whose inputs are all
    fp32 (differences straight from them) and keys with an fp16 input (converted first: a LoRA'd
    input is an fp32 copy beside fp16 stored weights) never share one; sizes off the sub-block."""
    from kernels import gram_pass

    batches = []
    real = gram_pass._medium_batch_products

    def spy(groups, bases, full):
        # each key: are the values its rows are made of all fp32 (the centred kind never reads the base)?
        batches.append([all(x.dtype == torch.float32 for x in xs + ([b] if b is not None and full else []))
                        for xs, b in zip(groups, bases)])
        return real(groups, bases, full)

    monkeypatch.setattr(gram_pass, "_medium_batch_products", spy)
    g = torch.Generator().manual_seed(11)
    keys = []
    for j, s in enumerate([SMALL_KEY + 1, 100_000, 70_001, 3000, 90_000, 1 << 18, 66_000, 81_920]):
        ref = torch.randn(s, generator=g)
        xs = [ref + 1e-2 * torch.randn(s, generator=g) for _ in range(3)]
        if j % 3 == 1:
            xs[2] = xs[2].half()
        keys.append((xs, (ref + 1e-2 * torch.randn(s, generator=g)).half() if base else None))
    got = _pass_rereading(keys, full)[0] if reread else _pass(keys, full)
    assert len(batches) >= 2 and all(len(set(b)) == 1 for b in batches), batches
    assert sum(map(len, batches)) == 7  # every key but the small one
    for j, (xs, b) in enumerate(keys):
        want = gram_matrix(xs, b, full=full)
        assert _rel(got[j][1:, 1:], want[1:, 1:]) < 1e-6, j
        assert _rel(got[j], want) < 1e-6, j


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("scale", [1e-3, 0.02])  # ‖p‖^2 ratios 1e-6 and 4e-4, under SHORT_POINT
def test_short_point_recomputed_in_fp64_like_gram_matrix(workers, scale):
    """A point 50-1000x shorter than the others: its norm from fp32 products is noise, so small
    and large keys alike get gram_matrix's fp64 recompute, read at once or at the end."""
    keys = _keys(3, torch.float32, seed=3)
    keys = [([xs[0], (scale * xs[1].double()).float(), xs[2]], None) for xs, _ in keys]
    with intra_op_threads(1):
        now = _pass(keys, True, workers)
        late, reads = _pass_rereading(keys, True, workers)
    assert torch.equal(now, late)
    assert sorted(reads) == [j for j, (xs, _) in enumerate(keys) if xs[0].numel() > SMALL_KEY]  # batched: held
    for j, (xs, b) in enumerate(keys):
        want = gram_matrix(xs, b, full=True)
        assert torch.equal(now[j], want), j
        exact = direct_gram(xs)
        sq = exact[0, 0] + 2 * exact[0, 2] + exact[2, 2]  # ‖p_2‖^2 = ‖m + d_2‖^2
        got = want[0, 0] + 2 * want[0, 2] + want[2, 2]
        assert abs(float(got / sq) - 1) < 1e-7, (j, float(got / sq))  # fp32 products: ~1e-2..1


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("where", ["model", "base"])
def test_nonfinite_small_key_named(full, where):
    keys = _keys(3, torch.float16, base=True)
    assert keys[3][0][0].numel() <= SMALL_KEY
    needle = _poison(keys, 3, where).split()[0]
    with pytest.raises(MergeInputError, match=f"k3.*{needle}|{needle}.*k3"):
        _pass(keys, full)


def _poison(keys, j, where) -> str:
    """A NaN into model_2's tensor of key j, or an Inf into its base; the message it must give."""
    xs, b = keys[j]
    if where == "model":
        xs[1] = xs[1].clone()
        xs[1][2] = float("nan")
        needle = "model_2 contains NaN"
    else:
        b = b.clone()
        b[0] = float("inf")
        needle = "base_model contains Inf"
    keys[j] = (xs, b)
    return needle


@pytest.mark.parametrize("full", [True, False])
def test_threads_give_bit_identical_grams(full):
    keys = _keys(3, torch.float16, seed=7, base=True)
    with intra_op_threads(1):
        assert torch.equal(_pass(keys, full, workers=3), _pass(keys, full, workers=1))


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


def test_threads_running_ahead_give_the_same_grams_and_first_error():
    """Items that hold no copies (held=False) run up to RUN_AHEAD·workers ahead and finish out of
    order; the Grams and the first error (in key order) are still those of one thread."""
    g = torch.Generator().manual_seed(3)
    sizes = [SMALL_KEY + 1 + 997 * (i % 7) for i in range(70)]  # medium batches of ~7 keys
    sizes[40] = 1 << 22  # finishes well after the keys behind it
    keys = [([torch.randn(s, generator=g) for _ in range(3)], None) for s in sizes]
    with intra_op_threads(1):
        want = _pass(keys, False, workers=1)
        for workers in (2, 3):
            assert torch.equal(_pass(keys, False, workers=workers, held=False), want)
    for j in (40, 43):
        keys[j][0][1] = keys[j][0][1].clone()
        keys[j][0][1][7] = float("nan")
    for workers in (1, 3):
        with pytest.raises(MergeInputError, match="key 'k40': model_2 contains NaN"):
            _pass(keys, True, workers=workers, held=False)


def test_worker_threads_close_cancels_items_not_started():
    import threading

    from kernels.threads import WorkerThreads

    pool = WorkerThreads(1)
    started, release, ran = threading.Event(), threading.Event(), []
    running = pool.submit(lambda _: (started.set(), release.wait(5)), None)
    queued = [pool.submit(ran.append, i) for i in range(5)]
    assert started.wait(5)  # the worker holds `running`: close() must not cancel it
    threading.Timer(0.2, release.set).start()
    pool.close()  # cancels the queued items at once, then waits for the running one
    assert running.done and not running.cancelled
    assert ran == [] and all(it.done and it.cancelled for it in queued)


def _pass_rereading(keys, full, workers=1, deferred=None):
    """The engine's pass: given `reread`, the checks of keys done one at a time wait for result()
    (deferred=True: small keys batched as for a GPU too). (Grams, keys read again)."""
    reads = []

    def reread(j):
        reads.append(j)
        return keys[j]

    gp = GramPass(len(keys), full=full, workers=workers, reread=reread, deferred=deferred)
    for j, (xs, b) in enumerate(keys):
        gp.add(j, xs, b, f"k{j}")
    return gp.result().cpu(), reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("workers", [1, 3])
def test_checks_at_the_end_give_the_same_bits(dtype, full, base, workers):
    keys = _keys(3, dtype, seed=13, base=base)
    with intra_op_threads(1):
        got, reads = _pass_rereading(keys, full, workers)
        ref = _pass(keys, full)
    assert torch.equal(got, ref)
    # nothing to act on, so nothing read again (fp8 rounds some tiny keys' inputs equal)
    assert not reads or dtype == torch.float8_e4m3fn, reads


def test_checks_at_the_end_flag_zero_points_and_name_nonfinite():
    keys = _keys(3, torch.float32)
    zero = [([xs[0], torch.zeros_like(xs[1]), xs[2]], None) for xs, _ in keys]
    got, reads = _pass_rereading(zero, True)
    large = [j for j, (xs, _) in enumerate(keys) if xs[0].numel() > SMALL_KEY]
    assert reads == large, "every large key with a zero point is flagged and read again"
    assert torch.equal(got, _pass(zero, True))
    for where in ("model", "base"):
        poisoned = _keys(3, torch.float16, base=True)
        needle = _poison(poisoned, 9, where)
        assert poisoned[9][0][0].numel() > SMALL_KEY
        with pytest.raises(MergeInputError, match=f"'k9': {needle}"):
            _pass_rereading(poisoned, False)


# --- the deferred pass (what the engine runs on a GPU): no host sync until result() ----------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


def _deferred(keys, full, device):
    on = [([x.to(device) for x in xs], None if b is None else b.to(device)) for xs, b in keys]
    return _pass_rereading(on, full, deferred=True if device == "cpu" else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("base", [False, True])
def test_deferred_pass_gives_gram_matrix(device, dtype, full, base):
    keys = _keys(3, dtype, seed=11, base=base)
    got, reads = _deferred(keys, full, device)
    # cuBLAS sums a sub-block's fp32 products in another order than the CPU: ~1e-6 apart
    tol = 1e-6 if device == "cpu" else 4e-6
    for j, (xs, b) in enumerate(keys):
        ref = gram_matrix(xs, b, full=full)  # on the CPU
        # keys gram_matrix's check acts on are read again (fp8 rounds some tiny keys' inputs equal)
        assert j not in reads or dtype == torch.float8_e4m3fn, j
        assert _rel(got[j][1:, 1:], ref[1:, 1:]) < tol, j
        assert _rel(got[j], ref) < tol, j
        if not full:
            assert bool((got[j][0] == ref[0]).all())
    again, _ = _deferred(keys, full, device)
    assert torch.equal(got, again), "same inputs, same device: the same bits"


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_pass_exact_cases(device):
    keys = _keys(3, torch.float16)
    same = [([xs[0]] * 3, None) for xs, _ in keys]
    got, _ = _deferred(same, False, device)
    assert bool((got[:, 1:, 1:] == 0).all()), "identical inputs must give an exactly zero centred block"
    zero = [([xs[0].float(), torch.zeros_like(xs[1]).float(), xs[2].float()], None) for xs, _ in keys]
    got, reads = _deferred(zero, True, device)
    assert reads == list(range(len(keys))), "every key with a zero point is flagged and read again"
    for j, (xs, b) in enumerate(zero):
        assert torch.equal(got[j], gram_matrix([x.to(device) for x in xs], b, full=True).cpu()), j


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("where,j", [("model", 3), ("model", 9), ("base", 3), ("base", 9)])
def test_deferred_pass_names_nonfinite(device, full, where, j):
    keys = _keys(3, torch.float16, base=True)
    needle = _poison(keys, j, where)
    with pytest.raises(MergeInputError, match=f"'k{j}': {needle}"):
        _deferred(keys, full, device)


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_pass_rescales_extreme_magnitudes(device):
    keys = _keys(3, torch.float32, seed=3)
    for j, scale in ((2, 2.0 ** 70), (9, 2.0 ** -80)):  # fp32 products overflow / underflow
        keys[j] = ([x * scale for x in keys[j][0]], None)
    got, reads = _deferred(keys, True, device)
    assert reads == [2, 9]
    for j in (2, 9):
        xs = [x.double() for x in keys[j][0]]
        ref = gram_matrix(xs, None, full=True)  # fp64 inputs: computed in fp64
        assert _rel(got[j], ref) < (1e-6 if device == "cpu" else 4e-6), j


@pytest.mark.cuda
@needs_cuda
def test_deferred_pass_ignores_a_host_tf32_setting():
    keys = _keys(3, torch.float32, seed=5)
    flags = torch.backends.cuda.matmul
    old = flags.allow_tf32
    flags.allow_tf32 = True  # what a host may set globally: 10-bit mantissas in matmuls
    try:
        got, _ = _deferred(keys, True, "cuda")
        assert flags.allow_tf32, "the caller's setting is restored"
    finally:
        flags.allow_tf32 = old
    for j, (xs, b) in enumerate(keys):
        assert _rel(got[j], gram_matrix(xs, b, full=True)) < 4e-6, j


def test_worker_items_run_in_the_submitters_inference_mode():
    """ComfyUI runs nodes in torch.inference_mode (thread-local): an item may update a tensor made
    there in place (the sign-elected median's signs and counts), and outside it stays outside."""
    from kernels.threads import WorkerThreads

    pool = WorkerThreads(2)
    seen = []
    try:
        for mode in (True, False):
            with torch.inference_mode(mode):
                t = torch.zeros(3)
                items = [pool.submit(lambda _: t.add_(1), None),
                         pool.submit(lambda _: seen.append(torch.is_inference_mode_enabled()), None)]
            for item in items:
                pool.wait_for(item)
                item.result()
            assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        pool.close()
    assert seen == [True, False]

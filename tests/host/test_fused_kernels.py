"""A ComfyUI started with BARYCENTER_CPU_KERNELS=fused: the pack compiles the kernels when the
server starts, the merge nodes then run them without compiling (the report says fused) and save
the same merge as the kernels compute here. In-process: when and how the warm-up is arranged, and
the one-time hint an eager CPU merge logs when the choice is unset."""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import types

import pytest

from harness.graphs import Graph, load_checkpoint, merge_node
from harness.server import FUSED_READY_LOG
from kernels import parse_weights, sign_elected_median
from tests.host.helpers import as_held, host_api_in_process, saved_checkpoint, storage_rounding, unet
from tests.host.test_robust_nodes import (NODES, assert_linear_close, base_files, capture, captured, expected_linear,
                                          family)

pytestmark = pytest.mark.host

FIRST_USE = "; first use)"  # ends the pack's log line when a merge has to compile a kernel itself


@pytest.fixture(scope="module")
def fused_server(host, checkpoints_dir, tmp_path_factory):
    from harness.server import ComfyServer

    srv = ComfyServer(tmp_path_factory.mktemp(f"comfy-fused-{host.kind}"), [checkpoints_dir], [], host=host,
                      env={"BARYCENTER_CPU_KERNELS": "fused"})
    srv.client = srv.start()
    try:
        srv.wait_for_log(FUSED_READY_LOG)  # compiled at startup: no merge below compiles
        yield srv
    finally:
        srv.stop()


def _merge_and_save_on_cpu(server, node, names, settings, prefix, base_name=None):
    """Run the merge node on the CPU (the fused kernels are CPU kernels: a GPU host would otherwise
    merge on its GPU) and save it; the report must say the fused kernels ran. -> the saved UNet."""
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    if base_name is not None:
        settings = {**settings, "base_model": Graph.out(load_checkpoint(g, base_name), 0)}
    merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **settings, device="cpu")
    report_id = capture(g, merged)
    g.add("CheckpointSave", model=Graph.out(merged, 0), clip=Graph.out(loaders[0], 1),
          vae=Graph.out(loaders[0], 2), filename_prefix=prefix)
    run = server.client.run(g.prompt(), timeout=600)
    assert run.status == "success", run.error_text
    assert captured(run, report_id)["cpu_gram_kernel"] == "fused"
    return unet(saved_checkpoint(server, prefix))


@pytest.mark.parametrize("node", ["BarycenterGeometricMedian", "BarycenterKarcherMean"])
def test_fused_kernels_in_comfyui_equal_the_kernel_result(fused_server, node):
    method, settings = NODES[node]
    names, xs = family([1, 2, 3])
    assert max(t.numel() for t in xs[0].values()) >= 1 << 20, "no key large enough for the fused kernel"
    saved = _merge_and_save_on_cpu(fused_server, node, names, settings, f"checkpoints/fused_{node}")
    log = fused_server.log_path.read_text(errors="replace").splitlines()
    # (the sign-elected median's loops are compiled at their first use: not warmed up)
    assert not [l for l in log if "Gram kernel" in l and FIRST_USE in l], \
        "a merge compiled a kernel that the startup warm-up should have"
    expected, _, scale = expected_linear(method, xs, settings)
    assert_linear_close(saved, expected, scale)


@pytest.mark.parametrize("drop", [0.0, 0.2])
def test_fused_sign_elected_median_in_comfyui_equals_the_kernel_result(fused_server, monkeypatch, drop):
    names, xs = family([1, 2, 3])
    base_name, base = base_files()
    settings = {**NODES["BarycenterSignElectedMedian"][1], "drop_rate": drop, "drop_seed": 3}
    saved = _merge_and_save_on_cpu(fused_server, "BarycenterSignElectedMedian", names, settings,
                                   f"checkpoints/fused_sign_elected_{drop}", base_name=base_name)
    log = fused_server.log_path.read_text(errors="replace")
    compiled = "compiling the fused CPU sign-elected median kernel for 3 inputs (election and Gram"
    assert compiled + (", with a drop" if drop else ", float32") in log
    monkeypatch.setenv("BARYCENTER_CPU_KERNELS", "eager")  # the reference: the eager kernel, here
    w = parse_weights("", 3)
    large = sorted(xs[0], key=lambda k: -xs[0][k].numel())[:4]  # keys the fused loops take
    assert xs[0][large[0]].numel() >= 1 << 20
    for k in large + list(xs[0])[::11]:
        held = [as_held(x[k], saved[k].dtype).float() for x in xs + [base]]
        exp, _ = sign_elected_median(held[:3], held[3], w, strength=1.0, drop_rate=drop, seed=3,
                                     key="diffusion_model." + k, tol=settings["tolerance"],
                                     max_iter=settings["max_iterations"], eps=settings["eps"])
        # rounding only (fused.py): fp32 sums in another order and an elected sign that flips
        # within the tie margin (2^-18 of the entry's weighted magnitude)
        err = (saved[k].double() - exp.double()).abs()
        assert bool((err <= 1e-5 * exp.double().abs() + 1e-6 + storage_rounding(saved[k], exp.double())).all()), k


class _FakeApp:
    """aiohttp's Application as far as the warm-up uses it: a startup-hook list, frozen once up."""

    def __init__(self, frozen=False):
        self.frozen = frozen
        self.hooks = []
        self.on_startup = self

    def append(self, hook):
        if self.frozen:
            raise RuntimeError("Cannot modify frozen list.")
        self.hooks.append(hook)


@pytest.fixture
def host_api(monkeypatch):
    api = host_api_in_process()
    started = []
    monkeypatch.setattr(api, "_warm_up", lambda: started.append("warm-up"))
    api.started = started
    return api


def _server_module(monkeypatch, app):
    fake = types.ModuleType("server")
    fake.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(app=app))
    monkeypatch.setitem(sys.modules, "server", fake)


def _join_warm_up():
    for t in threading.enumerate():
        if t.name == "barycenter-fused-warm-up":
            t.join(10)


@pytest.mark.parametrize("kernels, warm_up, arranged", [
    ("fused", None, True), ("fused", "1", True), ("fused", "0", False), ("eager", None, False), (None, None, False)])
def test_warm_up_runs_at_server_start_only_with_the_fused_kernels(host_api, monkeypatch, kernels, warm_up, arranged):
    for env, value in (("BARYCENTER_CPU_KERNELS", kernels), (host_api.WARM_UP_ENV, warm_up)):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
    app = _FakeApp()
    _server_module(monkeypatch, app)
    assert host_api.warm_fused_kernels_on_start() is arranged
    assert len(app.hooks) == (1 if arranged else 0) and host_api.started == []  # nothing before the server starts
    for hook in app.hooks:
        asyncio.run(hook(app))
    _join_warm_up()
    assert host_api.started == (["warm-up"] if arranged else [])


def test_warm_up_starts_at_once_when_the_server_is_already_up(host_api, monkeypatch):
    monkeypatch.setenv("BARYCENTER_CPU_KERNELS", "fused")
    _server_module(monkeypatch, _FakeApp(frozen=True))
    assert host_api.warm_fused_kernels_on_start()
    _join_warm_up()
    assert host_api.started == ["warm-up"]


def test_no_warm_up_without_a_server(host_api, monkeypatch):
    monkeypatch.setenv("BARYCENTER_CPU_KERNELS", "fused")
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert not host_api.warm_fused_kernels_on_start()


def test_a_failing_warm_up_is_a_warning_not_a_crash(monkeypatch, caplog):
    api = host_api_in_process()

    def broken(dtypes):
        raise OSError("disk full")

    monkeypatch.setattr(api.fused_kernels, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger=api.__name__):
        api._warm_up()  # returns: the server's thread must not die with an exception
    assert any("warming up the fused CPU Gram kernels failed: OSError: disk full" in r.getMessage()
               for r in caplog.records)


def test_an_eager_cpu_merge_suggests_the_fused_kernels_once(monkeypatch, caplog):
    api = host_api_in_process()  # puts the host on sys.path
    import comfy.sd

    from harness.checkpoints import checkpoint
    from harness.loading import load_pack
    from tests.host.test_robust_nodes import FAMILY

    monkeypatch.delenv("BARYCENTER_CPU_KERNELS", raising=False)
    monkeypatch.setattr(api.fused_kernels, "_suggested", [])
    models = [comfy.sd.load_checkpoint_guess_config(str(checkpoint(seed=s, **FAMILY)), output_vae=False,
                                                    output_clip=False)[0] for s in (1, 2, 3)]
    gm = load_pack().NODE_CLASS_MAPPINGS["BarycenterGeometricMedian"]
    with caplog.at_level(logging.INFO, logger=api.fused_kernels.__name__):
        for weights in ("", "1,2,3"):
            gm().merge(model_1=models[0], model_2=models[1], model_3=models[2], weights=weights, device="cpu",
                       **NODES["BarycenterGeometricMedian"][1])
    hints = [r for r in caplog.records if "BARYCENTER_CPU_KERNELS=fused" in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelno == logging.INFO

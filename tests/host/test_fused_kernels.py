"""A ComfyUI started with BARYCENTER_CPU_KERNELS=fused: the merge nodes run the compiled Gram
kernels (the report says so) and save the same merge as the kernels compute here."""
from __future__ import annotations

import pytest

from harness.graphs import Graph, load_checkpoint, merge_node
from tests.host.helpers import saved_checkpoint, unet
from tests.host.test_robust_nodes import NODES, assert_linear_close, capture, captured, expected_linear, family

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def fused_server(host, checkpoints_dir, tmp_path_factory):
    from harness.server import ComfyServer

    srv = ComfyServer(tmp_path_factory.mktemp(f"comfy-fused-{host.kind}"), [checkpoints_dir], [], host=host,
                      env={"BARYCENTER_CPU_KERNELS": "fused"})
    srv.client = srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("node", ["BarycenterGeometricMedian", "BarycenterKarcherMean"])
def test_fused_kernels_in_comfyui_equal_the_kernel_result(fused_server, node):
    method, settings = NODES[node]
    names, xs = family([1, 2, 3])
    assert max(t.numel() for t in xs[0].values()) >= 1 << 20, "no key large enough for the fused kernel"
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    # device cpu: the fused kernels are CPU kernels (a GPU host would otherwise merge on its GPU)
    merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **settings, device="cpu")
    report_id = capture(g, merged)
    prefix = f"checkpoints/fused_{node}"
    g.add("CheckpointSave", model=Graph.out(merged, 0), clip=Graph.out(loaders[0], 1),
          vae=Graph.out(loaders[0], 2), filename_prefix=prefix)
    run = fused_server.client.run(g.prompt(), timeout=600)
    assert run.status == "success", run.error_text
    assert captured(run, report_id)["cpu_gram_kernel"] == "fused"
    expected, _, scale = expected_linear(method, xs, settings)
    assert_linear_close(unet(saved_checkpoint(fused_server, prefix)), expected, scale)

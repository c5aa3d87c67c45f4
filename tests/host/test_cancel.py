"""Cancel: /interrupt during a long merge stops it between keys, the server goes on, and the same
prompt queued again gives the full, correct result (nothing half-merged was cached)."""
from __future__ import annotations

import time

import pytest

from harness.graphs import Graph, load_checkpoint, merge_node
from tests.host.helpers import saved_checkpoint, unet
from tests.host.test_robust_nodes import NODES, assert_linear_close, expected_linear, family

pytestmark = pytest.mark.host


def test_interrupt_mid_merge_then_full_result(comfy, server):
    seeds = list(range(1, 13))  # the node's maximum: 12 inputs
    names, xs = family(seeds)
    settings = {**NODES["BarycenterKarcherMean"][1], "tolerance": 2e-7}
    def graph(node, settings, prefix):
        g = Graph()
        loaders = [load_checkpoint(g, n) for n in names]
        merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **settings)
        g.add("CheckpointSave", model=Graph.out(merged, 0), clip=Graph.out(loaders[0], 1),
              vae=Graph.out(loaders[0], 2), filename_prefix=prefix)
        return g, merged

    # loads the 12 checkpoints once, so the timed run is the merge itself; a geometric median
    # (centred Grams) so that the Karcher merge (full Grams) reads its inputs again
    warm, _ = graph("BarycenterGeometricMedian", NODES["BarycenterGeometricMedian"][1], "checkpoints/cancel_warm")
    assert comfy.run(warm.prompt()).status == "success"
    g, merged = graph("BarycenterKarcherMean", settings, "checkpoints/cancel_twelve")

    pid = comfy.queue(g.prompt())
    t0 = time.monotonic()
    seen = None
    while time.monotonic() - t0 < 120 and seen is None:
        for e in comfy.events("progress"):
            d = e.get("data", {})
            if str(d.get("node")) == merged and d.get("prompt_id", pid) == pid and 0 < d["value"] < d["max"]:
                seen = d
                break
        time.sleep(0.01)
    prog = [(e["data"].get("node"), e["data"].get("value"), e["data"].get("max")) for e in comfy.events("progress")]
    assert seen is not None, f"the merge finished before it could be cancelled; progress: {prog[-20:]}"
    comfy.interrupt()
    run = comfy.wait(pid)
    assert run.status == "error", "the interrupted prompt reported success"
    kinds = [m[0] for m in run.messages]
    assert "execution_interrupted" in kinds, kinds
    assert not list((server.output_dir / "checkpoints").glob("cancel_twelve*")), "a half-made merge was saved"
    assert server.alive()

    again = comfy.run(g.prompt())
    assert again.status == "success", again.error_text
    saved = unet(saved_checkpoint(server, "checkpoints/cancel_twelve"))
    expected, _, scale = expected_linear("karcher", xs, settings)
    assert_linear_close(saved, expected, scale)

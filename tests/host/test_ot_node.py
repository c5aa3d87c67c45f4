"""OT fusion in the real host: fusing A with a function-preserving permutation of A gives A's
image back, where ModelMergeSimple of the same pair does not."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

from harness.checkpoints import checkpoint, load_state_dict
from harness.graphs import Graph, conditioning, load_checkpoint, merge_node, sample_and_save
from kernels.ot import permute_state_dict
from tests.host.helpers import assert_non_degenerate, ckpt, image_array

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def permuted_pair(checkpoints_dir):
    a = ckpt(arch="sd15", seed=1, base_seed=0, noise=0.05)
    sd = load_state_dict(checkpoint(arch="sd15", seed=1, base_seed=0, noise=0.05))
    name = "ot_permuted_sd15_s1.safetensors"
    save_file(permute_state_dict(sd, seed=11), str(checkpoints_dir / name))
    return a, name


def _image(comfy, build, prefix):
    g = Graph()
    model, vae = build(g)
    pos, neg = conditioning(g, "sd15")
    save = sample_and_save(g, model, vae, pos, neg, prefix=prefix, seed=5)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    img = image_array(comfy, run, save)
    assert_non_degenerate(img)
    return img


@pytest.mark.parametrize("solver,epsilon", [("exact", 1e-3), ("sinkhorn", 1e-3)])
def test_ot_fusion_of_a_permuted_copy_gives_the_original_image(comfy, permuted_pair, solver, epsilon):
    a, pa = permuted_pair

    def alone(g):
        la = load_checkpoint(g, a)
        return Graph.out(la, 0), Graph.out(la, 2)

    def permuted(g):
        lp = load_checkpoint(g, pa)
        return Graph.out(lp, 0), Graph.out(lp, 2)

    def fused(g):
        la, lp = load_checkpoint(g, a), load_checkpoint(g, pa)
        m = merge_node(g, "BarycenterOTFusion", [Graph.out(la, 0), Graph.out(lp, 0)], anchor=1, solver=solver,
                       epsilon=epsilon, rounds=1, barycenter="mean")
        return Graph.out(m, 0), Graph.out(la, 2)

    def plain(g):
        la, lp = load_checkpoint(g, a), load_checkpoint(g, pa)
        m = g.add("ModelMergeSimple", model1=Graph.out(la, 0), model2=Graph.out(lp, 0), ratio=0.5)
        return Graph.out(m, 0), Graph.out(la, 2)

    img_a = _image(comfy, alone, "ot_a")
    img_p = _image(comfy, permuted, "ot_perm")
    img_ot = _image(comfy, fused, f"ot_fused_{solver}")
    img_mms = _image(comfy, plain, "ot_mms")
    diff = lambda x, y: float(np.abs(x - y).mean())  # noqa: E731
    assert diff(img_p, img_a) < 1.0, "the permutation is not function-preserving in ComfyUI"
    assert diff(img_ot, img_a) < 1.0, f"OT fusion of (A, permuted A) does not give A's image: {diff(img_ot, img_a)}"
    assert diff(img_mms, img_a) > 5 * max(diff(img_ot, img_a), 0.2), "plain averaging should differ"

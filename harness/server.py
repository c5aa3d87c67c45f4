"""Start a real ComfyUI on a free loopback port, with the pack registered.

On CPU (`main.py --cpu`) unless BARYCENTER_COMFY_GPU=1: then ComfyUI picks its own device (CUDA
on a GPU machine), and the host tests and benchmarks run the merge on it."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .client import ComfyClient
from .host import Host, ensure_host, write_extra_paths
from .paths import CACHE, VENV_PYTHON


GPU_ENV = "BARYCENTER_COMFY_GPU"
FP16_ENV = "BARYCENTER_COMFY_FP16_UNET"
# what the pack logs once it has compiled its fused CPU kernels at startup (engine/host_api.py)
FUSED_READY_LOG = "fused CPU Gram kernels ready"


def gpu_host() -> bool:
    """True when the harness runs ComfyUI on its own device choice instead of --cpu."""
    return os.environ.get(GPU_ENV, "0") == "1"


def fp16_unet_host() -> bool:
    """True when ComfyUI keeps UNets in fp16 (--fp16-unet): what a GPU host does on its own, so a
    CPU host checks the same storage roundings."""
    return os.environ.get(FP16_ENV, "0") == "1"


def unets_in_half() -> bool:
    """True when the host may keep (and save) a UNet in 16 bits even where a file holds fp32:
    a GPU host by its own choice, or --fp16-unet."""
    return gpu_host() or fp16_unet_host()


def device_args() -> list[str]:
    return ([] if gpu_host() else ["--cpu"]) + (["--fp16-unet"] if fp16_unet_host() else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, run_dir: Path, checkpoint_dirs=(), lora_dirs=(), host: Host | None = None,
                 extra_args=(), require_nodes=("BarycenterWeightedMean",), env: dict | None = None):
        self.host = host or ensure_host()
        self.run_dir = Path(run_dir)
        self.checkpoint_dirs = [Path(d) for d in checkpoint_dirs]
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.extra_args = list(extra_args)
        self.require_nodes = list(require_nodes)
        self.extra_env = dict(env or {})  # extra environment variables for the server process
        self.port = None
        self.proc = None
        self.log_path = self.run_dir / "server.log"
        self.startup_s = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    def start(self, timeout: float = 180.0) -> ComfyClient:
        for sub in ("output", "input", "temp", "user"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        yaml = write_extra_paths(self.run_dir, self.checkpoint_dirs, self.lora_dirs)
        self.port = free_port()
        python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
        args = [python, "main.py", *device_args(), "--listen", "127.0.0.1", "--port", str(self.port),
                "--output-directory", str(self.output_dir), "--input-directory", str(self.run_dir / "input"),
                "--temp-directory", str(self.run_dir / "temp"), "--extra-model-paths-config", str(yaml),
                "--disable-auto-launch"]
        if not self.host.is_snapshot:  # keep the user's tree untouched: user data and db in the run dir
            args += ["--base-directory", str(self.run_dir), "--user-directory", str(self.run_dir / "user"),
                     "--database-url", f"sqlite:///{self.run_dir / 'user' / 'comfyui.db'}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1")
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args + self.extra_args, cwd=self.host.tree, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        client = ComfyClient(self.url)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                client.object_info("CheckpointLoaderSimple")
                break
            except Exception:
                if time.monotonic() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; log:\n{self.log_tail()}")
                time.sleep(0.25)
        self.startup_s = time.monotonic() - t0
        # --quick-test-for-ci style checks pass even when a pack fails to import: ask for its nodes.
        info = client.object_info()
        missing = [n for n in self.require_nodes if n not in info]
        if missing:
            self.stop()
            raise RuntimeError(f"ComfyUI started but lacks nodes {missing}: the pack failed to import; "
                               f"log:\n{self.log_tail()}")
        return client

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 600.0) -> float:
        """Seconds until `text` appears in the server's log (RuntimeError if the server exits first)."""
        t0 = time.monotonic()
        while text not in self.log_path.read_text(errors="replace"):
            if not self.alive():
                raise RuntimeError(f"ComfyUI exited before logging '{text}'; log:\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no '{text}' in the server log within {timeout:.0f} s; log:\n{self.log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def pack_warnings(self) -> list[str]:
        """Python warnings the pack's own files printed into the server's log (numpy/torch
        RuntimeWarnings reach the user's console as noise that looks like a fault)."""
        pat = re.compile(r"custom_nodes/comfyui-barycenter/\S+\.py:\d+: \w*Warning: .*")
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return pat.findall(text)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


def default_run_dir(name: str) -> Path:
    d = CACHE / "runs" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d

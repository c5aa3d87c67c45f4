"""Shared fixtures. Host tests start ONE real ComfyUI per session (the PyPI snapshot by default,
current ComfyUI when COMFYUI_DIR is set) and talk to it only through its HTTP API."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

try:  # CI draws the same hypothesis examples on every run: a red CI is the change's, not the draw's
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if IN_CI and not os.environ.get("BARYCENTER_HYPOTHESIS_RANDOM"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # hypothesis is dev-only; the tests that need it import it themselves
    pass


def pytest_runtest_logreport(report):
    """BARYCENTER_INSTAFAIL=1: a failure's traceback printed when it happens, not at the end of
    the session (GPU runs are cut off at the device's time limit, and the end never comes)."""
    if report.failed and os.environ.get("BARYCENTER_INSTAFAIL") == "1":
        print(f"\n[instafail] {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}", file=sys.stderr)


def skip_or_fail(reason: str):
    """A missing prerequisite fails in CI (a skipped host test proves nothing) and skips locally."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def host():
    from harness.host import ensure_host

    return ensure_host()


@pytest.fixture(scope="session")
def checkpoints_dir():
    from harness.paths import CACHE

    d = CACHE / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def server(host, checkpoints_dir, tmp_path_factory):
    from harness.paths import CACHE
    from harness.server import ComfyServer

    loras = CACHE / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    srv = ComfyServer(tmp_path_factory.mktemp(f"comfy-{host.kind}"), [checkpoints_dir], [loras], host=host)
    client = srv.start()
    print(f"\n[host] {host.kind} ComfyUI at {host.tree} ready in {srv.startup_s:.1f} s", file=sys.stderr)
    srv.client = client
    try:
        client.listen()
    except Exception as e:  # events are a bonus; /history is the source of truth
        print(f"[host] websocket not available: {e}", file=sys.stderr)
    yield srv
    client.close()
    srv.stop()
    noise = srv.pack_warnings()
    assert not noise, f"the pack printed warnings into ComfyUI's log: {noise}"


@pytest.fixture(autouse=True)
def drop_saved_checkpoints(tmp_path_factory):
    """Deletes the checkpoints a test's prompts saved once the test ends: each is tens of MB, the
    suite saves hundreds (8+ GB in all), and CI machines may have little free disk. Files saved
    by module or session fixtures (set up before this) stay for the tests that read them."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.glob("*/output/**/*.safetensors"))
    yield
    for f in base.glob("*/output/**/*.safetensors"):
        if f not in before:
            f.unlink(missing_ok=True)


@pytest.fixture
def comfy(server):
    """The API client, with models freed after each test so cases do not leak into each other."""
    yield server.client
    if server.alive():
        server.client.free()

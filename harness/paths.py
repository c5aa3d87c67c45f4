"""Where the harness keeps things: everything generated lives under the ignored .cache folder."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BARYCENTER_CACHE", REPO_ROOT / ".cache"))
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"

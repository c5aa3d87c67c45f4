#!/usr/bin/env bash
# Newcomer command (a): set up everything, then run the example merge through a real ComfyUI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BARYCENTER_NO_PEERS=1 bash "$root/scripts/bootstrap.sh"
cd "$root" && exec .venv/bin/python -m harness.demo "$@"

#!/usr/bin/env bash
# Newcomer command (b): set up everything, then run the whole test suite (host tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
bash "$root/scripts/setup_browser.sh" || { [ "${CI:-}" = "true" ] && exit 1; echo "test.sh: no browser; tests/browser will skip" >&2; }
cd "$root"
set +e
.venv/bin/python -m pytest tests -ra "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
[ "$rc" -eq 5 ] && echo "test.sh: pytest collected no test" >&2
exit "$rc"

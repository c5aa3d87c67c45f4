#!/usr/bin/env bash
# Browser for the front-end tests (tests/browser): Debian's Chromium plus npm playwright-core,
# driven through Chromium's executable (never `playwright install`, which downloads browsers).
# Idempotent: does nothing when both are already there.
#   /usr/bin/chromium            (apt-get install chromium, when missing and we are root)
#   .cache/node/node_modules/playwright-core   (npm, into an ignored folder)
# Without a browser the browser tests skip locally and FAIL in CI (CI=true).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chromium="${BARYCENTER_CHROMIUM:-/usr/bin/chromium}"
node_dir="$root/.cache/node"
pw_version="1.56.1"

if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup_browser: installing chromium (apt)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || {
      apt-get update -q >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    }
  else
    echo "setup_browser: $chromium is missing and apt-get is not usable here (need root)" >&2
    exit 1
  fi
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup_browser: installing nodejs + npm (apt)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null
  else
    echo "setup_browser: node/npm are missing" >&2
    exit 1
  fi
fi

if [ ! -f "$node_dir/node_modules/playwright-core/package.json" ]; then
  echo "setup_browser: npm install playwright-core@$pw_version into .cache/node" >&2
  mkdir -p "$node_dir"
  [ -f "$node_dir/package.json" ] || echo '{"name": "barycenter-browser-tests", "private": true}' > "$node_dir/package.json"
  (cd "$node_dir" && npm install --no-audit --no-fund --silent "playwright-core@$pw_version" >/dev/null)
fi

"$chromium" --version >/dev/null 2>&1
echo "setup_browser: $("$chromium" --version 2>/dev/null), playwright-core $(node -p "require('$node_dir/node_modules/playwright-core/package.json').version")" >&2

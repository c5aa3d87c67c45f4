#!/usr/bin/env bash
# Sets up the project's Python environments (idempotent; a stamp skips work already done).
#   .venv        host (ComfyUI) dependencies + dev tools; runs ComfyUI, the tests and the demo
#   .venv-peers  reference peers whose pins clash with ComfyUI's (mergekit); used by tests/bench
#                through a subprocess only
# torch is pinned to 2.13.0 (the CPU build this machine kind ships) so no requirement pulls a
# CUDA torch. torchvision's CUDA wheel needs two lines guarded to import on CPU torch (see README).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
torch_pin="torch==2.13.0"

host_reqs=("torchvision==0.28.0" torchsde einops "transformers>=4.37.2,<5" "tokenizers>=0.13.3" sentencepiece
  "safetensors>=0.4.2" "aiohttp>=3.11.8" "yarl>=1.18.0" pyyaml Pillow scipy tqdm psutil "kornia>=0.7.1"
  "numpy>=1.25.0" requests)
dev_reqs=("pytest>=8" hypothesis websocket-client "sd-mecha==1.1.8" "pot>=0.9" scikit-learn matplotlib)
peer_reqs=("mergekit==0.1.5")

current_reqs=()
if [ -n "${COMFYUI_DIR:-}" ]; then
  [ -f "$COMFYUI_DIR/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 2; }
  # current ComfyUI's own requirements, minus the torch family (pinned above)
  while IFS= read -r line; do
    line="${line%%#*}"; line="$(echo "$line" | xargs)"
    [ -z "$line" ] && continue
    case "$line" in torch|torch[=\<\>]*|torchvision*|torchaudio*) continue;; esac
    current_reqs+=("$line")
  done < "$COMFYUI_DIR/requirements.txt"
fi

stamp_of() { printf '%s\n' "$@" | sha1sum | cut -c1-12; }

make_venv() {  # dir, stamp, packages...
  local dir="$1" stamp="$2"; shift 2
  if [ -f "$dir/.stamp-$stamp" ]; then return 0; fi
  [ -x "$dir/bin/python" ] || "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  echo "bootstrap: installing into $dir (one time)" >&2
  # the machine's pip config lists local indexes that lack most names; hide their warnings
  "$dir/bin/python" -m pip install -q "$torch_pin" "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2)
  rm -f "$dir"/.stamp-*
  touch "$dir/.stamp-$stamp"
}

host_stamp="$(stamp_of "$torch_pin" "${host_reqs[@]}" "${dev_reqs[@]}" "${current_reqs[@]}")"
make_venv .venv "$host_stamp" "${host_reqs[@]}" "${dev_reqs[@]}" "${current_reqs[@]}"

# torchvision CUDA wheel on CPU torch: guard the two fake-kernel registrations that are not
# guarded by _has_ops() like the others (HOST.md). Only in this project's environment.
tv="$(.venv/bin/python - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
print(pathlib.Path(spec.origin).parent / "_meta_registrations.py")
PY
)"
if grep -q '^@torch.library.register_fake("torchvision::nms")' "$tv"; then
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$tv"
fi
.venv/bin/python -c "import torchvision" || { echo "bootstrap: torchvision still fails to import" >&2; exit 1; }

if [ "${BARYCENTER_NO_PEERS:-0}" != "1" ]; then
  peer_stamp="$(stamp_of "$torch_pin" "${peer_reqs[@]}")"
  make_venv .venv-peers "$peer_stamp" "${peer_reqs[@]}"
fi
echo "bootstrap: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2

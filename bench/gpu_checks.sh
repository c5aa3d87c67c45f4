#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command (CI has none; run it on a GPU machine):
#   bash bench/gpu_checks.sh [cuda] [tests] [bench] [host | host-weights host-rest] [host-bench] [host-bench-full]
#   cuda             the tests marked cuda: kernels on CUDA equal the CPU ones
#   tests            the kernel and OT tests (CUDA cases included)
#   bench            bench/bench_cuda.py: Gram pass bandwidth vs the device's (SD1.5, SDXL)
#   host             the host tests with ComfyUI on the GPU (BARYCENTER_COMFY_GPU=1)
#   host-weights     the host tests that compare merged weights (marker `weights`), and
#   host-rest        the rest: the host tests in two runs (for a runner with a per-call time limit)
#   host-bench       bench.bench_host on the GPU, tiny models
#   host-bench-full  the same at SD1.5 shapes
# Uses the python on PATH (or $PYTHON) with ComfyUI's requirements; logs go to $LOGS (out/gpu).
# KINDS (bench: "sd15 sdxl") and HOST_TESTS (host: tests/host) narrow a part.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
logs="${LOGS:-$root/out/gpu}"
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 BARYCENTER_INSTAFAIL=1  # failures printed as they happen: a cut-off run keeps them
[ $# -gt 0 ] || set -- cuda tests bench host host-bench
rc=0
run() {  # name, command...
  local name="$1"; shift
  echo "== $name: $*" >&2
  local t0=$SECONDS
  "$@" >"$logs/$name.log" 2>&1
  local r=$?
  echo "== $name: rc $r in $((SECONDS - t0)) s" >&2
  tail -n 25 "$logs/$name.log" >&2
  [ $r -eq 0 ] || rc=$r
}
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 2
for what in "$@"; do
  case "$what" in
    cuda) run cuda "$py" -m pytest -c tests/pytest.ini tests -m cuda -q -ra -p no:cacheprovider ;;
    tests) run tests "$py" -m pytest -c tests/pytest.ini tests/kernels tests/ot -q -ra -p no:cacheprovider \
             --ignore=tests/kernels/test_kernels_peers.py ;;
    bench) run bench "$py" bench/bench_cuda.py --kind ${KINDS:-sd15 sdxl} --rounds 5 ;;
    host) run host env BARYCENTER_COMFY_GPU=1 "$py" -m pytest -c tests/pytest.ini ${HOST_TESTS:-tests/host} -v -ra -p no:cacheprovider ;;
    host-weights) run host-weights env BARYCENTER_COMFY_GPU=1 "$py" -m pytest -c tests/pytest.ini tests/host -m weights -v -ra -p no:cacheprovider ;;
    host-rest) run host-rest env BARYCENTER_COMFY_GPU=1 "$py" -m pytest -c tests/pytest.ini tests/host -m "not weights" -v -ra -p no:cacheprovider ;;
    host-bench) run host-bench env BARYCENTER_COMFY_GPU=1 "$py" -m bench.bench_host --arch sd15 --repeats 5 --gram-cache off on ;;
    host-bench-full) run host-bench-full env BARYCENTER_COMFY_GPU=1 "$py" -m bench.bench_host --arch sd15_full --repeats 3 --gram-cache off on ;;
    *) echo "gpu_checks: unknown part '$what'" >&2; exit 2 ;;
  esac
done
exit $rc

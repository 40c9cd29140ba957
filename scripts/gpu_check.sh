#!/usr/bin/env bash
# The GPU check of issue 14, in ONE device call (the device tool's `run`, at most ~8 minutes):
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)   # with carried wheels: carry=[".whl"]
#
# 1. a venv with --system-site-packages (the machine's CUDA torch is used, nothing is downloaded);
#    wheels under .whl/ (if carried) are installed without an index (to /tmp/ftl-site); the machine has no
#    expecttest, which test/test_grad.py needs; fetch it here first (pure Python, any platform):
#      python3 -m pip download --no-deps -d .whl expecttest==0.3.0     (.whl/ is git-ignored)
# 2. builds functorch_lite._C against that torch with every core (cmake + ninja, build/gpu);
# 3. test/test_cuda.py (CUDA), then a CPU sanity subset (test/test_grad.py, or a file that needs
#    no expecttest where it is missing);
# 4. benchmarks/run.py --only transforms --device cuda (dp_clip and scaling are CPU-only sections);
# 5. a summary. Logs, JUnit XML and the benchmark table go to $OUT (default ./gpu_out), written as
#    they come, so a step stopped by its `timeout` still returns what it had.
#
# GPU_CHECK_DRY=1 skips what needs CUDA (the CUDA tests run on CPU tensors instead, through
# FUNCTORCH_LITE_CUDA_TESTS_ON_CPU=1, and the benchmark runs --quick on the CPU): a dry run of every
# step on a machine without a GPU. GPU_CHECK_PYTHON=/path/to/python uses that interpreter as is
# (no venv); GPU_CHECK_SKIP_BUILD=1 keeps the extension already in functorch_lite/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
DRY="${GPU_CHECK_DRY:-0}"
JOBS="$(nproc)"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" CCACHE_BASEDIR="$ROOT"
declare -A RESULT
ORDER=()
T0=$SECONDS

# The whole script stays inside this many seconds (the device call's limit less the start):
# each step's limit is cut to what is left, and a step with under 20 s left is skipped.
BUDGET="${GPU_CHECK_BUDGET:-460}"

# step NAME SECONDS CMD...: runs CMD under `timeout`, its output tee'd to $OUT/NAME.log.
step() {
  local name="$1" limit="$2"
  shift 2
  local t=$SECONDS left=$((BUDGET - (SECONDS - T0)))
  [ "$left" -lt "$limit" ] && limit=$left
  ORDER+=("$name")
  if [ "$limit" -lt 20 ]; then
    RESULT[$name]="skipped: the budget of ${BUDGET}s is spent"
    return 124
  fi
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=$?
  [ "$rc" = 124 ] && echo "=== $name: TIMED OUT after ${limit}s" | tee -a "$OUT/$name.log"
  RESULT[$name]="rc=$rc $((SECONDS - t))s"
  return "$rc"
}

summary() {
  {
    echo "=== summary (total $((SECONDS - T0))s, dry=$DRY)"
    for n in "${ORDER[@]}"; do printf '  %-12s %s\n' "$n" "${RESULT[$n]}"; done
    for n in cuda_tests cpu_tests; do
      [ -f "$OUT/$n.log" ] && printf '  %-12s %s\n' "$n" "$(grep -E '(passed|failed|error|skipped)' "$OUT/$n.log" | tail -1)"
    done
  } | tee "$OUT/summary.txt"
}
trap summary EXIT

# ---------------------------------------------------------------------------------------- 1. env
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY="$GPU_CHECK_PYTHON"
else
  VENV="${GPU_CHECK_VENV:-/tmp/ftl-gpu-venv}"
  [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV" ||
    echo "warning: no venv (python3 -m venv failed): using python3 as is"
  PY="$VENV/bin/python"
  # torch outside the system site-packages (or no venv): use the machine's python3 as is.
  "$PY" -c "import torch" 2>/dev/null || PY="$(command -v python3)"
fi
# Carried wheels go to a directory of their own on PYTHONPATH: that works for either python.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target /tmp/ftl-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/ftl-site" ||
    echo "warning: the carried wheels did not install"
fi
export PATH="$(dirname "$PY"):$PATH"
step env 60 "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)
print('cuda available:', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')
print('cudnn:', torch.backends.cudnn.version() if torch.cuda.is_available() else None)
for m in ('expecttest', 'opacus', 'dp_accounting', 'hypothesis', 'matplotlib'):
    try:
        __import__(m); print(m, 'yes')
    except ImportError:
        print(m, 'MISSING')
" || exit 1
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "CUDA is not available (GPU_CHECK_DRY=1 for a dry run on CPU)" | tee -a "$OUT/env.log"
  exit 1
fi

# -------------------------------------------------------------------------------------- 2. build
if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
  BUILD="${GPU_CHECK_BUILD_DIR:-$ROOT/build/gpu}"
  build() {
    if [ ! -f "$BUILD/CMakeCache.txt" ]; then
      cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
        -DPython3_EXECUTABLE="$PY" || return 1
    fi
    cmake --build "$BUILD" --target functorch_lite_C -j "$JOBS" || return 1
    cp "$BUILD"/functorch_lite/_C*.so "$ROOT/functorch_lite/"
  }
  step build "${GPU_CHECK_BUILD_LIMIT:-240}" bash -c "$(declare -f build); BUILD='$BUILD' ROOT='$ROOT' PY='$PY' JOBS='$JOBS' build" || exit 1
fi
step import 60 "$PY" -c "import functorch_lite as ft; print(ft.__file__); ft.show_config()" || exit 1

# -------------------------------------------------------------------------------------- 3. tests
if [ "$DRY" = 1 ]; then
  step cuda_tests 150 env FUNCTORCH_LITE_CUDA_TESTS_ON_CPU=1 "$PY" -m pytest test/test_cuda.py -q -ra \
    -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
else
  step cuda_tests 150 "$PY" -m pytest test/test_cuda.py -q -ra -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml"
fi
# test_grad.py imports expecttest at module level (its error-message tests); the GPU machine has
# none unless it was carried as a wheel: then a CPU file that needs neither it nor Opacus.
if "$PY" -c "import expecttest" 2>/dev/null; then
  CPU_TESTS=(test/test_grad.py)
else
  CPU_TESTS=(test/test_vmap_nn_rules.py test/test_linearize.py)
fi
step cpu_tests 60 "$PY" -m pytest "${CPU_TESTS[@]}" -x -q -p no:cacheprovider --junitxml="$OUT/cpu_tests.xml"

# ---------------------------------------------------------------------------------- 4. benchmarks
if [ "$DRY" = 1 ]; then
  step bench 150 "$PY" benchmarks/run.py --only transforms --device cpu --quick --out "$OUT/bench" \
    --json "$OUT/bench/transforms.json"
else
  step bench 180 "$PY" benchmarks/run.py --only transforms --device cuda --out "$OUT/bench" \
    --json "$OUT/bench/transforms.json"
fi
exit 0

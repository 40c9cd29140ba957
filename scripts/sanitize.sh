#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of functorch_lite (on demand, not in CI: the
# build alone takes tens of minutes). Builds the extension and the C++ tests with
# -fsanitize=address,undefined in their own build dir (build/sanitize), runs the C++ tests, then the
# core Python test files against the sanitized extension, with libasan preloaded into Python.
#
#   bash scripts/sanitize.sh                      # build + C++ tests + default Python files
#   bash scripts/sanitize.sh test/test_module.py  # other Python test files instead of the defaults
#   FT_SAN_BUILD_ONLY=1 bash scripts/sanitize.sh  # only (re)build
#
# Environment: VENV (the virtualenv, default .venv), JOBS (build parallelism, default nproc),
# FT_SAN_HALT=0 to log every UBSan report and carry on instead of stopping at the first.
# Any sanitizer report fails the run; reports are also collected under build/sanitize/logs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
JOBS="${JOBS:-$(nproc)}"
BUILD="$ROOT/build/sanitize"
export PATH="$VENV/bin:$PATH"
export CCACHE_BASEDIR="$ROOT"
cd "$ROOT"

# -O1 keeps the build and the run bearable; frame pointers give ASan usable stacks. UBSan
# recovers (halt_on_error in UBSAN_OPTIONS decides), so one run can list every report.
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -G Ninja \
    -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
    -DPython3_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DCMAKE_CXX_FLAGS="$SAN_FLAGS" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
fi
cmake --build "$BUILD" --target functorch_lite_C functorch_lite_cpptest -j "$JOBS"
[ -n "${FT_SAN_BUILD_ONLY:-}" ] && exit 0

# The Python package with the sanitized extension, in a directory of its own, so that nothing
# (the source tree on sys.path, an editable install) can put the regular build in its place.
PKG="$BUILD/pkg"
rm -rf "$PKG" && mkdir -p "$PKG/functorch_lite"
(cd functorch_lite && find . -name '*.py' -exec cp --parents {} "$PKG/functorch_lite/" \;)
cp "$BUILD"/functorch_lite/_C*.so "$PKG/functorch_lite/"

LOGS="$BUILD/logs"
rm -rf "$LOGS" && mkdir -p "$LOGS"
HALT=$([ "${FT_SAN_HALT:-1}" = 0 ] && echo 0 || echo 1)
# Leak checking is off for Python (the interpreter and torch keep their globals alive at exit by
# design); on for the C++ test binary, which owns everything it allocates.
ASAN_COMMON="abort_on_error=0:halt_on_error=$HALT:print_summary=1:log_path=$LOGS/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=$HALT:log_path=$LOGS/ubsan"
status=0

echo "== C++ tests (ASan+UBSan, leak checking on)"
ASAN_OPTIONS="$ASAN_COMMON:detect_leaks=1" "$BUILD/functorch_lite_cpptest" || status=1

LIBASAN="$(g++ -print-file-name=libasan.so)"
# libstdc++ right after libasan: python itself does not link it, so without this ASan's
# __cxa_throw interceptor finds no real __cxa_throw at startup and aborts at the first C++
# exception ("CHECK failed: ... real___cxa_throw").
LIBSTDCXX="$(g++ -print-file-name=libstdc++.so)"
FILES=("$@")
[ ${#FILES[@]} -eq 0 ] && FILES=(test/test_vmap.py test/test_grad.py test/test_jac.py)
echo "== Python tests (ASan+UBSan, libasan preloaded): ${FILES[*]}"
# Run from $PKG so that it, not the source tree, is first on sys.path; check which build loaded.
(
  cd "$PKG"
  export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
  export ASAN_OPTIONS="$ASAN_COMMON:detect_leaks=0"
  # The system allocator lets ASan see Python objects' memory too.
  export PYTHONMALLOC=malloc
  "$PY" -c "import functorch_lite._C as c, sys; assert c.__file__.startswith('$PKG'), c.__file__"
  "$PY" -m pytest "${FILES[@]/#/$ROOT/}" -q -p no:cacheprovider -x
) || status=1

if compgen -G "$LOGS/*" >/dev/null; then
  echo "== sanitizer reports (in $LOGS):"
  grep -h -E "ERROR: AddressSanitizer|runtime error:|SUMMARY" "$LOGS"/* | sort | uniq -c | head -50
  status=1
else
  echo "== no sanitizer reports"
fi
exit $status

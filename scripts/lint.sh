#!/usr/bin/env bash
# Check formatting and lint without writing anything; CI runs this. Fix with: bash scripts/format.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
fail=0
files=$(git ls-files -co --exclude-standard -- 'csrc/*.cpp' 'csrc/*.h' 'examples/*.cpp' 'examples/*.h')
"$BIN/clang-format" --dry-run --Werror $files || fail=1
"$BIN/python" scripts/families.py --check || fail=1
"$BIN/ruff" format --check . || fail=1
"$BIN/ruff" check . || fail=1
if [ "$fail" != 0 ]; then
  echo "lint: formatting or lint errors above; fix with: bash scripts/format.sh" >&2
  exit 1
fi
echo "lint: clean (clang-format, family layout, ruff format, ruff check)"

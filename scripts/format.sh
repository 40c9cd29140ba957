#!/usr/bin/env bash
# Format all code in place: clang-format for C++ (csrc/, examples/), the family-registration
# layout (scripts/families.py), ruff for Python. scripts/lint.sh checks the same without writing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
git ls-files -co --exclude-standard -- 'csrc/*.cpp' 'csrc/*.h' 'examples/*.cpp' 'examples/*.h' | xargs "$BIN/clang-format" -i
"$BIN/python" scripts/families.py --fix
"$BIN/ruff" format --quiet .
"$BIN/ruff" check --fix --quiet .

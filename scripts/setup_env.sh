# Sourced by demo.sh and test.sh: creates .venv (once), installs torch==2.13.0 and the build and
# test dependencies into it, and builds functorch_lite in place. Safe to re-run: incremental.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${FUNCTORCH_LITE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import torch, pytest, expecttest, cmake, ninja, sklearn, tqdm, matplotlib" 2>/dev/null; then
  # A current pip builds editable installs through pyproject.toml (PEP 660).
  pip install --quiet --disable-pip-version-check --upgrade pip
  # torch==2.13.0 exactly (in every pip command, so nothing upgrades it): a bare `torch` would
  # pull a multi-GB CUDA build. scikit-learn, tqdm and matplotlib are the demo's.
  pip install --quiet --disable-pip-version-check torch==2.13.0 \
    "setuptools>=70" wheel cmake ninja pytest expecttest numpy scikit-learn tqdm matplotlib
fi
# ccache (if installed) keys on paths relative to the checkout, so fresh clones share the cache.
export CCACHE_BASEDIR="$ROOT"
cd "$ROOT"
# The `dp` extra: dp-accounting, for functorch_lite.dp's privacy accounting.
pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[dp]" torch==2.13.0

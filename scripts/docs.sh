#!/usr/bin/env bash
# Build the docs site into docs/_build/html, failing on any warning (-W), after running the
# docstring examples as doctests. The tutorials (docs/tutorials/*.py) execute during the build,
# so a broken example fails it too. Uses the active virtual environment (or $VENV, or .venv;
# `bash scripts/test.sh` sets one up) and the functorch_lite of this checkout (PYTHONPATH), and
# installs the `docs` extra's packages (setup.py) into it when they are missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${VENV:-}" ]; then
  PY="$VENV/bin/python"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  PY="$ROOT/.venv/bin/python"
fi
[ -x "$PY" ] || { echo "docs: no virtual environment at $PY; run bash scripts/test.sh once (or set VENV)" >&2; exit 1; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import sphinx, furo, myst_parser, sphinx_gallery, matplotlib, sklearn, dp_accounting, transformers" 2>/dev/null; then
  # The pins live in one place, setup.py's `docs` extra; installing the extra itself would
  # build the package, so only its requirements are installed (torch pinned so nothing moves it).
  mapfile -t reqs < <("$PY" scripts/extra_requires.py docs)
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0 "${reqs[@]}"
fi
# torch loads its forward-AD decompositions through the deprecated torch.jit.script (not ours)
"$PY" -m pytest --doctest-modules functorch_lite -q -p no:cacheprovider \
  -W 'ignore:`torch.jit.script` is deprecated:DeprecationWarning'
"$PY" -m sphinx -W --keep-going -q -b html docs docs/_build/html
echo "docs: built docs/_build/html/index.html"

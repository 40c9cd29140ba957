#!/usr/bin/env bash
# The whole test suite: set up everything needed, then the Python tests and the C++ tests.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# Opacus is a test-only oracle (its RDP accountant cross-checks functorch_lite.dp's); never
# imported by the package. Pinned together with torch so it cannot upgrade torch.
python -c "import opacus" 2>/dev/null ||
  pip install --quiet --disable-pip-version-check torch==2.13.0 opacus==1.6.0
# transformers, test-only like Opacus: GPT-2-style layers (Conv1D, tied lm_head) for ft.dp's rules
# (test/test_dp_tied.py); never imported by the package. Pinned with torch.
python -c "import transformers" 2>/dev/null ||
  pip install --quiet --disable-pip-version-check torch==2.13.0 transformers==4.57.1
# The fuzzer's test dependency (test/test_fuzz.py), kept here so setup_env.sh stays as it is.
python -c "import hypothesis" 2>/dev/null || pip install --quiet --disable-pip-version-check torch==2.13.0 hypothesis
# Formatters/linters, pinned so that CI and developers agree on the output (scripts/lint.sh).
python -c "import ruff, clang_format" 2>/dev/null ||
  pip install --quiet --disable-pip-version-check torch==2.13.0 ruff==0.17.6 clang-format==23.1.5
cmake --build build/cmake --target functorch_lite_cpptest -j "$(nproc)" >/dev/null
# Both suites always run; the script fails if either does.
status=0
VENV="$VIRTUAL_ENV" bash scripts/lint.sh || status=1
(cd build/cmake && ctest --output-on-failure) || status=1
python -m pytest test -q -ra -p no:cacheprovider "$@" || status=1
bash scripts/docs.sh || status=1 # the docs site with -W: doctests, tutorials executed, API reference
exit $status

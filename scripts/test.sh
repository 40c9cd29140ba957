#!/usr/bin/env bash
# The whole test suite: set up everything needed, then the Python tests and the C++ tests.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cmake --build build/cmake --target functorch_lite_cpptest -j "$(nproc)" >/dev/null
(cd build/cmake && ctest --output-on-failure)
python -m pytest test -q -ra "$@"

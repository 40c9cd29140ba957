#!/usr/bin/env bash
# The main job: set up everything needed, then run the demo.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python examples/demo.py "$@"

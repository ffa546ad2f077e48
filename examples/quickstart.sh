#!/usr/bin/env bash
# The README's main job on a fresh machine: install, then run examples/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e .
exec python3 examples/quickstart.py "$@"

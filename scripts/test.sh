#!/usr/bin/env bash
# Installs vpeft with its test dependencies (if needed) and runs lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python -m ruff check src tests
python -m pytest -q "$@"

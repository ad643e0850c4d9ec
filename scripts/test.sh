#!/usr/bin/env bash
# The whole test suite, as CI runs it: format check, lint, types, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
bin=.venv/bin
echo "== ruff format --check"; "$bin/ruff" format --check .
echo "== ruff check";          "$bin/ruff" check .
echo "== mypy (strict, app/)"; "$bin/mypy"
echo "== pytest";              "$bin/python" -m pytest --cov --cov-report=term:skip-covered "$@"

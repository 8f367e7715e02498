#!/usr/bin/env bash
# mypy --strict on Shipyard's packages, resolved from their folders (pyproject.toml's mypy_path: contract/,
# operator/, runtime/ each hold an ordinary package of the `shipyard` namespace): no link tree, no mapping.
set -euo pipefail
cd "$(dirname "$0")/.."
"${VENV:-.venv}/bin/mypy" -p shipyard.contract -p shipyard.operator -p shipyard.runtime

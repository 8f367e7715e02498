#!/usr/bin/env bash
# mypy --strict on shipyard.operator. The package lives in the folder operator/ (mapped by setuptools), which
# mypy cannot map by itself: a link tree under build/ gives it the real package path, so our own modules are
# type-checked as themselves rather than as untyped imports.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree"; mkdir -p "$tree/shipyard"
ln -s "$PWD/operator" "$tree/shipyard/operator"
ln -s "$PWD/runtime" "$tree/shipyard/runtime"
cd "$tree"
MYPYPATH=. "${VENV:-../../.venv}/bin/mypy" --config-file ../../pyproject.toml --explicit-package-bases -p shipyard.operator

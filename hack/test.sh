#!/usr/bin/env bash
# The whole test suite (`make test`): lint, type check, then every tier under tests/: e2e (Shipyard end to end:
# real pod processes via hack/node_agent.py, Debian's Prometheus), harness (the test machinery's own checks: the node
# agent, the skip rules), integration (a real local control plane, KWOK nodes) and unit. Each fixture starts its own
# control plane and stops it at the end. Needs root (the node agent uses mount namespaces and cgroups) and the Debian
# packages of hack/debian-packages.txt, which it installs when missing (kubectl is built with the control plane).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
venv=${VENV:-.venv}
"$venv/bin/ruff" check contract operator runtime tests bench hack
VENV="$(cd "$venv" && pwd)" bash hack/typecheck.sh
# The CRD and the chart's copy are what the API's types generate (`make crd` rewrites them).
"$venv/bin/python" -m shipyard.operator.crd --check
# Each image's packages import only what that image installs (docs/packaging.md).
"$venv/bin/python" -c "import sys, shipyard.operator, shipyard.operator.handlers; assert 'torch' not in sys.modules, 'the operator imported torch'"
"$venv/bin/python" -c "import sys, shipyard.runtime.server.lifecycle, shipyard.runtime.compress; bad = {'kopf', 'lightkube', 'aiohttp'} & set(sys.modules); assert not bad, f'the runtime imported {bad}'"
# What the tiers need from Debian (openssl, util-linux, lua5.4, prometheus/promtool, ...: hack/debian-packages.txt):
# installed when missing (as root), else a clear error naming each package.
bash hack/install-packages.sh
# pytest exits 5 when no test ran: that is a failure here, as is any skip not in tests/skips.yaml (tests/rules.py).
"$venv/bin/pytest" -q -p no:cacheprovider --timeout=600 "$@" tests

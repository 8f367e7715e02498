#!/usr/bin/env bash
# The whole test suite (`make test`): lint, type check, then every tier under tests/: unit, integration (a real
# local control plane, KWOK nodes) and e2e (real pod processes via hack/node_agent.py, Debian's Prometheus).
# Each tier's fixture starts its own control plane and stops it at the end. Needs root (the e2e node agent uses
# mount namespaces), unshare/setpriv/mount, openssl, lua5.4 and prometheus/promtool: see README.md (kubectl is built
# with the control plane, at its version).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
venv=${VENV:-.venv}
"$venv/bin/ruff" check contract operator runtime tests bench hack
VENV="$(cd "$venv" && pwd)" bash hack/typecheck.sh
# Each image's packages import only what that image installs (docs/packaging.md).
"$venv/bin/python" -c "import sys, shipyard.operator, shipyard.operator.handlers; assert 'torch' not in sys.modules, 'the operator imported torch'"
"$venv/bin/python" -c "import sys, shipyard.runtime.server.lifecycle, shipyard.runtime.compress; bad = {'kopf', 'lightkube', 'aiohttp'} & set(sys.modules); assert not bad, f'the runtime imported {bad}'"
# The e2e tier needs Debian's Prometheus (and root, for the node agent's mount namespaces): install it or fail clearly.
if [ ! -x /usr/bin/prometheus ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "test.sh: the e2e tier needs /usr/bin/prometheus: apt-get install -y prometheus (as root)" >&2
    exit 1
  fi
fi
# pytest exits 5 when no test ran: that is a failure here, as is any skip of the integration tier.
"$venv/bin/pytest" -q -p no:cacheprovider --timeout=600 "$@" tests

#!/usr/bin/env bash
# The whole test suite: lint, type check, then every tier (unit, integration on the real local control plane).
# The integration fixture starts the control plane itself and stops it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
venv=${VENV:-.venv}
"$venv/bin/ruff" check operator runtime tests bench hack
VENV="$(cd "$venv" && pwd)" bash hack/typecheck.sh
"$venv/bin/python" -c "import sys, shipyard.operator, shipyard.operator.handlers; assert 'torch' not in sys.modules, 'the operator imported torch'"
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

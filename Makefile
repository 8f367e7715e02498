# Shipyard developer entry points. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
comma := ,
PY ?= python3.11
VENV ?= .venv
PIP_GROUPS ?= dev
export OMP_NUM_THREADS ?= 2

.PHONY: binaries-all demo test unit integration harness e2e soak lint typecheck crd cluster-up cluster-down binaries clean venv

# The venv is rebuilt when a pyproject.toml changes: the three distributions (editable: each folder's package is
# imported from the checkout) and the workspace's dependency groups (pip >= 25.1 reads --group).
$(VENV)/.installed: pyproject.toml contract/pyproject.toml operator/pyproject.toml runtime/pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade 'pip>=25.1'
	$(VENV)/bin/pip install --quiet -e ./contract -e './operator[dashboard]' -e ./runtime $(foreach g,$(subst $(comma), ,$(PIP_GROUPS)),--group $(g))
	@touch $@

venv: $(VENV)/.installed

binaries:
	bash hack/build-binaries.sh

# The test suite also needs KEDA (the autoscaling scenarios): a long build on a cold machine, cached after.
binaries-all:
	bash hack/build-binaries.sh keda

demo: venv binaries
	bash hack/demo.sh

test: venv binaries-all
	bash hack/test.sh

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: venv binaries
	$(VENV)/bin/pytest -q -m integration tests/integration

# The test machinery's own checks: the node agent as a kubelet (real pods, CPU limits), the skip rules, the S3 server.
harness: venv binaries
	$(VENV)/bin/pytest -q -m harness tests/harness

# Shipyard end to end: real pods (hack/node_agent.py, needs root) and a real Prometheus (Debian's package); see
# docs/e2e.md.
e2e: venv binaries
	$(VENV)/bin/pytest -q -m e2e tests/e2e

# The inference server under 200,000 generated hostile requests (tests/integration/test_server_fuzz.py; no cluster).
soak: venv
	SHIPYARD_SOAK=1 OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -s tests/integration/test_server_fuzz.py

# The CRD (and the chart's copy) generated from the API's types (operator/shipyard/operator/spec.py, status.py), and
# the state diagram of docs/operator.md printed from the transition table (paste it between its markers).
crd: venv
	$(VENV)/bin/python -m shipyard.operator.crd

lint: venv
	$(VENV)/bin/ruff check contract operator runtime tests bench hack
	VENV=$(abspath $(VENV)) bash hack/typecheck.sh

cluster-up: binaries
	python3 hack/cluster.py up

cluster-down:
	python3 hack/cluster.py down

clean: cluster-down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

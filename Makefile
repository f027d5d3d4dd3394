# The two commands (README): `make demo` and `make test`. Each sets up its own venv.
PYTHON ?= python3
VENV := .venv
EDGE_VENV := .venv-edge
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; a bare `torch` would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0
# OpenMP threads that spin while waiting make a shared 2-core machine ~10x slower (measured:
# 20 s vs 2.2 s per demo training step next to one busy process); sleeping costs nothing alone.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-core test-edge-alone venv clean audit

$(VENV)/.installed.stamp: pyproject.toml edge_runtime/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e "edge_runtime[cpu,png,sign]" -e ".[dev]" "$(TORCH_PIN)"
	touch $@

venv: $(VENV)/.installed.stamp

demo: venv
	$(VENV)/bin/collafuse demo --out demo-out

test: test-core test-edge-alone

test-core: venv
	$(PY) -m pytest -q tests || [ $$? -eq 5 ]

# Proves the edge runtime installs and runs with no torch/diffusers: a fresh venv, edge alone.
test-edge-alone:
	rm -rf $(EDGE_VENV)
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install -q "./edge_runtime[cpu,png,sign]" pytest pytest-aiohttp hypothesis
	cd tests/edge && ../../$(EDGE_VENV)/bin/python -m pytest -q -p no:cacheprovider --rootdir=. -c /dev/null -o asyncio_mode=auto -o asyncio_default_fixture_loop_scope=function . || [ $$? -eq 5 ]

# Dependency audit of .venv with pip-audit (PyPI's vulnerability data). Exit 1 = known
# vulnerabilities; an unreachable/ignorant service only warns (AUDIT_STRICT=1: exit 2). See .ci/audit.py.
audit: venv
	$(PY) -m pip_audit --version >/dev/null 2>&1 || $(PY) -m pip install -q pip-audit
	$(PY) .ci/audit.py

clean:
	rm -rf $(VENV) $(EDGE_VENV) demo-out

# The oldest versions collafuse-edge declares (the '>=' floors of edge_runtime/pyproject.toml,
# numpy 1.x as on a Jetson), installed exactly in a fresh venv, running tests/edge.
EDGE_OLDEST_VENV := build/venv-edge-oldest
.PHONY: test-edge-oldest test-aarch64
test-edge-oldest:
	rm -rf $(EDGE_OLDEST_VENV)
	mkdir -p build
	$(PYTHON) -m venv $(EDGE_OLDEST_VENV)
	$(PYTHON) edge_runtime/scripts/oldest_versions.py constraints > build/edge-oldest-constraints.txt
	PIP_CONSTRAINT=build/edge-oldest-constraints.txt $(EDGE_OLDEST_VENV)/bin/python -m pip install -q \
	  "./edge_runtime[cpu,png,sign]" pytest "pytest-aiohttp<1.1" hypothesis
	$(EDGE_OLDEST_VENV)/bin/python edge_runtime/scripts/oldest_versions.py check
	cd tests/edge && ../../$(EDGE_OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider --rootdir=. -c /dev/null -o asyncio_mode=auto -o asyncio_default_fixture_loop_scope=function . || [ $$? -eq 5 ]

# arm64: tests/edge in an emulated arm64 Debian userland and the parity of one bundle arm64 vs
# this machine. Opt-in (needs root; registers a binfmt_misc handler): see .ci/aarch64/test.sh.
test-aarch64:
	.ci/aarch64/test.sh

# Two commands for a new user: `make demo` and `make test`. Each sets up everything it
# needs (virtual environment, the project and its extras, the Mosquitto broker, and for the
# tests Prometheus) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedledger-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-arm64 arm64-tools test-crash test-provision provision-tools setup broker prometheus lint bench dashboards reference clean help

help:
	@echo "make demo    set everything up and run a federated training on this machine"
	@echo "make test    set everything up and run the test suite (the longer suites follow)"
	@echo "make test-slow   whole federations with privacy on, the fuzz and soak runs (a few minutes)"
	@echo "make test-arm64  the edge agent in an emulated arm64 Debian userland (root; slow)"
	@echo "make test-crash  kill gateways, agents and a broker at random moments over whole tasks"
	@echo "make test-provision  boot Debian test hosts and run the Ansible playbooks against them (root)"
	@echo "make bench   print the benchmark figures as JSON"
	@echo "make lint    ruff over the tree"
	@echo "make dashboards  regenerate monitoring/dashboards/*.json from monitoring/dashboards.py"
	@echo "make reference  regenerate docs/configuration.md from the config models"

demo: setup broker
	$(BIN)/fedledger demo $(DEMO_ARGS)

test: setup broker prometheus
	$(BIN)/python -m pytest -m "not provision and not crash and not slow and not arm64" $(PYTEST_ARGS)

# The long ones: DP and SecAgg federations with agents killed mid-round, the 100k-payload fuzz,
# the soak and privacy benchmarks, the remaining gateway-kill moments.
test-slow: setup broker prometheus
	$(BIN)/python -m pytest -m "slow and not provision and not crash and not arm64" $(PYTEST_ARGS)

# The edge agent installed from an aarch64 wheelhouse into a Debian bookworm arm64 userland
# (debootstrap + qemu-user binfmt + systemd-nspawn, so it needs root) and run against a gateway
# on this machine. The first rootfs build under emulation takes ~10 minutes; it is cached.
test-arm64: setup broker arm64-tools
	$(BIN)/python -m pytest -m arm64 tests/arm64 $(PYTEST_ARGS)

arm64-tools:
	@if command -v debootstrap >/dev/null 2>&1 && command -v systemd-nspawn >/dev/null 2>&1 \
	  && [ -x /usr/bin/qemu-aarch64-static ] && [ -e /usr/sbin/update-binfmts ]; then exit 0; fi; \
	$(MAKE) --no-print-directory _apt PKGS="debootstrap systemd-container qemu-user-static binfmt-support" \
	  WHAT="the tools that run an emulated arm64 userland"

# Random SIGKILLs of the gateway (and a broker, and an agent) over whole tasks with real
# agents: a few minutes. FEDLEDGER_CRASH_SEED=<seed> replays a run's kill moments.
test-crash: setup broker
	$(BIN)/python -m pytest -m crash -s tests/integration/test_random_kills.py $(PYTEST_ARGS)

# The Ansible site converged for real on two Debian hosts (debootstrap + systemd-nspawn in
# network namespaces, so it needs root); a few minutes, most of it the first rootfs build.
test-provision: setup provision-tools
	$(BIN)/python -m pytest -m provision tests/provision $(PYTEST_ARGS)

provision-tools:
	@if command -v debootstrap >/dev/null 2>&1 && command -v systemd-nspawn >/dev/null 2>&1 \
	  && command -v ssh >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then exit 0; fi; \
	$(MAKE) --no-print-directory _apt PKGS="debootstrap systemd-container openssh-client iproute2" \
	  WHAT="the tools that boot the provisioning test hosts"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd ansible && ../$(BIN)/ansible-lint

bench: setup broker
	$(BIN)/fedledger bench aggregate --json
	$(BIN)/fedledger bench ingest --json
	$(BIN)/fedledger bench ledger --json
	$(BIN)/fedledger bench agent --json
	$(BIN)/fedledger bench accuracy --json
	$(BIN)/fedledger bench robustness --json
	$(BIN)/fedledger bench async --json
	$(BIN)/fedledger bench soak --minutes 10 --json

# The Grafana dashboards are code (monitoring/dashboards.py); the JSON is committed.
dashboards: setup
	$(BIN)/python -m monitoring.dashboards --out monitoring/dashboards

# The configuration reference is generated from the config models; the Markdown is committed.
reference: setup
	$(BIN)/fedledger config reference --out docs/configuration.md

setup: $(STAMP)

# A venv needs Debian's python3-venv; install it when missing (root or sudo), else explain.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "error: fedledger needs Python 3.10 or newer ($(PYTHON) is older); set PYTHON=..." >&2; exit 1; }
	@if ! $(PYTHON) -m venv $(VENV) >/dev/null 2>&1; then \
	  rm -rf $(VENV); \
	  $(MAKE) --no-print-directory _apt PKGS="python3-venv" WHAT="Python's venv module"; \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	@touch $@

broker:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then exit 0; fi; \
	$(MAKE) --no-print-directory _apt PKGS="mosquitto" WHAT="the Mosquitto MQTT broker"

# The tests start their own Prometheus (own port, config and storage) to scrape a gateway;
# a system service the package may start is not used.
prometheus:
	@if command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; then exit 0; fi; \
	$(MAKE) --no-print-directory _apt PKGS="prometheus" WHAT="the Prometheus server the metrics tests run"

# Install Debian packages $(PKGS) as root or through sudo; say what to do when neither works.
_apt:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=sudo; \
	else echo "error: $(WHAT) is missing and installing it needs root." >&2; \
	     echo "       Run: sudo apt-get install $(PKGS)   (then run make again)" >&2; exit 1; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "error: $(WHAT) is missing; install the package '$(PKGS)' with your package manager." >&2; exit 1; fi; \
	echo "installing $(PKGS) ($(WHAT)) with apt-get"; \
	$$SUDO apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(PKGS) >/dev/null

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
	@# the demo's folder only when the demo made it (it carries the marker)
	if [ -f fedledger-demo/.fedledger-site ]; then rm -rf fedledger-demo; fi

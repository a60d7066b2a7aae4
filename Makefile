# Two commands on a fresh machine: `make demo` and `make test`. Each runs `make setup` first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the builds and the tests need (qemu, base-image bootstrap, ssh for the communicator).
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap genisoimage openssh-client openssh-server sudo \
	e2fsprogs fdisk gdisk grub-pc-bin grub2-common mount util-linux uidmap postgresql python3-venv docker.io docker-compose
# npm for Azurite, only when no npm is on PATH (a nodejs from elsewhere is fine).
APT_PACKAGES += $(if $(shell command -v npm),,npm)
STAMP := $(VENV)/.installed
# uv from PATH, else from PyPI into .uv/ (stock Debian 12 / Ubuntu 24.04 refuse `pip install` into the system
# Python, PEP 668).
UV := $(or $(shell command -v uv),.uv/bin/uv)

.PHONY: setup apt demo test test-pending test-fast lint bench clean up down
setup: apt $(STAMP)

# Installs only what is missing, so a second run costs a dpkg query.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt: installing $$missing"; \
		SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

.uv/bin/uv:
	python3 -m venv .uv && .uv/bin/pip install -q uv

# constraints.txt: the development pins (pyproject.toml declares ranges, for installing into other Airflows).
$(STAMP): pyproject.toml constraints.txt | $(UV)
	@[ -x $(PY) ] || $(UV) venv -q --python 3.11 $(VENV)
	# --compile-bytecode: PYTHONDONTWRITEBYTECODE is set on these machines and imports would be twice as slow.
	$(UV) pip install -q --python $(PY) --compile-bytecode -c constraints.txt -e '.[test]'
	@touch $@

# Azurite (npm), the blob storage emulator the Azure tests run against (tests/azure/armdouble/azurite.py).
# Inside the venv dir: ignored by git and removed by `make clean` like the Python tools.
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob
setup: $(AZURITE)
$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/azurite azurite@3

demo: setup
	$(PY) -m goldsmith.demo

# Tests marked `pending` belong to unfinished features (the compose deployment's workers, step layers on VMs):
# they are kept runnable with `make test-pending` and out of `make test` until they pass.
test: setup lint
	$(VENV)/bin/pytest -q -m 'not pending' $(PYTEST_ARGS)

test-pending: setup
	$(VENV)/bin/pytest -q -m pending $(PYTEST_ARGS)

# ruff over the whole tree, mypy over the files pyproject's [tool.mypy] lists.
lint: setup
	$(VENV)/bin/ruff check src plugins tests bench
	$(VENV)/bin/mypy

# The step logic without real VM builds (seconds, not minutes).
test-fast: setup
	$(VENV)/bin/pytest -q -m 'not vm' $(PYTEST_ARGS)

# Benchmarks (bench/): Debian's packer (1.6.6) for P1; dag-factory for P3, beside the venv rather than in it
# (its Airflow plugin would load in every Airflow process). Results in bench/results/, the table in README.md.
DAG_FACTORY := $(VENV)/dag-factory/dagfactory
bench: setup $(DAG_FACTORY)
	@command -v packer >/dev/null || $(MAKE) apt APT_PACKAGES=packer
	$(PY) -m bench
$(DAG_FACTORY):
	$(UV) pip install -q --python $(PY) --target $(VENV)/dag-factory --no-deps --compile-bytecode dag-factory==1.1.0

# The compose deployment (docker-compose.yaml; README "Deploy"). STAND_INS=1 builds local stand-ins of the
# upstream images where no container registry is reachable; PROFILES=flower adds Flower.
up: setup .env
	deploy/compose.sh dockerd >/dev/null
	deploy/compose.sh images
	deploy/compose.sh seed
	deploy/compose.sh up
	@echo "UI and REST API: http://localhost:$$(grep -oP '^AIRFLOW_API_PORT=\K.*' .env || echo 8080) (login in .env)"
down:
	deploy/compose.sh down
.env:
	sed -e "s|^AIRFLOW_FERNET_KEY=.*|AIRFLOW_FERNET_KEY=$$($(PY) -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')|" \
	    -e "s|^AIRFLOW_JWT_SECRET=.*|AIRFLOW_JWT_SECRET=$$(openssl rand -hex 32)|" .env.example > $@

clean:
	rm -rf $(VENV) .uv build dist src/*.egg-info

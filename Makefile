# The two commands: `make up` runs the platform, `make test` runs the tests.
# Ports and folders come from GOZON_* variables (see README, "Changing ports").
.PHONY: up down status logs test test-chart test-faults lock bootstrap

PY := .venv/bin/python

bootstrap:
	@scripts/bootstrap

up: bootstrap
	@$(PY) -m scripts.stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m scripts.stack down; else python3 -m scripts.stack down; fi

status:
	@if [ -x $(PY) ]; then $(PY) -m scripts.stack status; else python3 -m scripts.stack status; fi

logs:
	@python3 -m scripts.stack logs $(if $(FOLLOW),--follow)

test:
	@scripts/check

# The Helm chart: lint, kubeconform for every charts/gozon/ci/*.yaml, helm-unittest, and
# install/upgrade/uninstall on a local Kubernetes control plane. The tools (helm, kubeconform,
# Kubernetes, etcd, kwok) are built once into ${GOZON_TOOLS_CACHE:-~/.cache/gozon} by
# scripts/k8s-tools; see docs/kubernetes.md. Extra pytest arguments: CHART_ARGS="-k lint".
test-chart: bootstrap
	@scripts/k8s-tools
	@.venv/bin/pytest tests/charts -p no:cacheprovider $(CHART_ARGS)

# The fault suite (tests/faults, docs/reliability.md): kills, restarts and overloads the
# platform under load and checks that nothing is lost. About 6-10 minutes.
test-faults: bootstrap
	@scripts/install-vegeta >/dev/null
	@.venv/bin/pytest tests/faults -p no:cacheprovider $(ARGS)

# Re-resolves requirements/lock.txt from pyproject.toml (then commit both).
lock: bootstrap
	@UV_PYTHON_DOWNLOADS=never $(PY) -m uv pip compile pyproject.toml --extra dev \
	  --python-version 3.11 --generate-hashes --quiet --no-header \
	  --custom-compile-command "make lock" -o requirements/lock.txt

# The two commands: `make up` runs the platform, `make test` runs the tests.
# Ports and folders come from GOZON_* variables (see README, "Changing ports").
.PHONY: up down status logs test test-faults lock bootstrap

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

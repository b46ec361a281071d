# The two commands: `make up` runs the platform, `make test` runs the tests.
# Ports and folders come from GOZON_* variables (see README, "Changing ports").
.PHONY: up down status logs test lock bootstrap

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

# Re-resolves requirements/lock.txt from pyproject.toml (then commit both).
lock: bootstrap
	@UV_PYTHON_DOWNLOADS=never $(PY) -m uv pip compile pyproject.toml --extra dev \
	  --python-version 3.11 --generate-hashes --quiet --no-header \
	  --custom-compile-command "make lock" -o requirements/lock.txt

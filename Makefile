# The two commands: `make up` runs the platform, `make test` runs the tests.
# Ports and folders come from GOZON_* variables (see README, "Changing ports").
.PHONY: up down status logs test test-chart test-k8s test-strimzi strimzi test-faults lock bootstrap image images compose-up \
	compose-down test-compose bench-capacity bench-calls

PY := .venv/bin/python

bootstrap:
	@scripts/bootstrap

up: bootstrap
	@$(PY) -m devstack up

down:
	@if [ -x $(PY) ]; then $(PY) -m devstack down; else python3 -m devstack down; fi

status:
	@if [ -x $(PY) ]; then $(PY) -m devstack status; else python3 -m devstack status; fi

logs:
	@python3 -m devstack logs $(if $(FOLLOW),--follow)

test:
	@scripts/check

# The Helm chart: lint, kubeconform for every charts/gozon/ci/*.yaml, helm-unittest, and
# install/upgrade/uninstall on a local Kubernetes control plane. The tools (helm, kubeconform,
# Kubernetes, etcd, kwok) are built once into ${GOZON_TOOLS_CACHE:-~/.cache/gozon} by
# scripts/k8s-tools; see docs/kubernetes.md. Extra pytest arguments: CHART_ARGS="-k lint".
test-chart: bootstrap
	@scripts/k8s-tools
	@.venv/bin/pytest tests/charts -p no:cacheprovider $(CHART_ARGS)

# The chart on a real one-node Kubernetes on this machine (k8s/node-cluster: containerd, kubelet,
# kube-proxy, CoreDNS, local-path provisioner, metrics-server): images built and imported, helm
# install --wait, helm test, a consumer and a database pod deleted under load, consumers scaled
# and autoscaled, a backup restored; the node is stopped at the end. Root only; see docs/kubernetes.md, "Verified on a real node". Extra pytest
# arguments: K8S_ARGS="-k saga".
test-k8s: bootstrap
	@scripts/test-k8s

# The chart's default Kafka path on the same node: Strimzi 1.2.0's operator and Kafka image built
# from ../shared/vendor's source (scripts/strimzi-build), installed from Strimzi's own Helm chart,
# reconciling the chart's Kafka, topics and SCRAM users; helm test, a broker pod deleted under
# load, a helm upgrade rolled by the operator. Root only; docs/kubernetes.md, "Strimzi on the
# node". Extra pytest arguments: STRIMZI_ARGS="-k acls".
test-strimzi: bootstrap
	@scripts/test-strimzi

# Only the Strimzi operator and Kafka images (cached; docs/kubernetes.md, "Strimzi on the node").
strimzi:
	@scripts/strimzi-build

# The fault suite (tests/faults, docs/reliability.md): kills, restarts and overloads the
# platform under load and checks that nothing is lost. About 6-10 minutes.
test-faults: bootstrap
	@scripts/install-vegeta >/dev/null
	@.venv/bin/pytest tests/faults -p no:cacheprovider $(ARGS)

# The capacity bench (docs/benchmarks.md, "Capacity"): vegeta through the gateway at fixed rates
# against a throwaway stack on free ports; prints markdown tables. Run by hand, never in CI.
# Other rates or lengths: BENCH_ARGS="--rates 50,100 --duration 30".
bench-capacity: bootstrap
	@scripts/install-vegeta >/dev/null
	@$(PY) -m bench.capacity $(BENCH_ARGS)

# The work each order costs every Python process, counted (function calls per order, by library)
# rather than timed, so it moves far less with the host (docs/benchmarks.md, "Calls per order").
bench-calls: bootstrap
	@scripts/install-vegeta >/dev/null
	@$(PY) -m bench.calls $(BENCH_ARGS)

# Re-resolves requirements/lock.txt from pyproject.toml, then the image's runtime.txt and
# build.txt within it (commit all of them).
lock: bootstrap
	@UV_PYTHON_DOWNLOADS=never $(PY) -m uv pip compile pyproject.toml --extra dev \
	  --python-version 3.11 --generate-hashes --quiet --no-header \
	  --custom-compile-command "make lock" -o requirements/lock.txt
	@UV_PYTHON_DOWNLOADS=never $(PY) -m uv pip compile pyproject.toml -c requirements/lock.txt \
	  --python-version 3.11 --generate-hashes --quiet --no-header -o requirements/runtime.txt
	@UV_PYTHON_DOWNLOADS=never $(PY) -m uv pip compile requirements/build.in \
	  -c requirements/lock.txt --python-version 3.11 --generate-hashes --quiet --no-header \
	  -o requirements/build.txt

# ---------------------------------------------------------------- Docker (docs/containers.md)
# The Gozon image, built hermetically: gozon:<version> and gozon:latest.
image: bootstrap
	@docker/build-image

# The image built and loaded into the local cluster of kubectl's current context: kind
# (`kind load docker-image`) or minikube (`minikube image load`). README, "With Kubernetes".
.PHONY: image-load
image-load:
	@docker/load-image

# Stand-ins for the public images (no registry needed) and the Gozon image on them; prints
# the variables to use: eval "$$(make -s images)"
images: bootstrap
	@docker/offline/build

# The compose stack, waited for until healthy. TRACES=1 adds the collector and Jaeger and makes
# the processes export to them. OFFLINE=1 (no registry) runs on the stand-ins from `make images`,
# without Grafana, the collector and Jaeger, which have none.
compose-up:
ifeq ($(OFFLINE),1)
	@vars=$$(docker/offline/build) && eval "$$vars" && \
	  docker compose up --detach --wait --no-build $$(docker compose config --services | grep -vx grafana)
else
	@$(if $(TRACES),GOZON_OTLP_ENDPOINT=http://otel-collector:4318) \
	  docker compose $(if $(TRACES),--profile observability) up --detach --wait
endif

# Stops the stack and keeps its data; VOLUMES=1 removes the data too.
compose-down:
	@docker compose --profile observability down $(if $(VOLUMES),--volumes) --remove-orphans

# Installs what is missing (engine, compose v2, base image), builds, runs the stack, tests it
# (the spec's scenario, e2e, Prometheus, crashes under load), then removes it.
test-compose:
	@scripts/test-compose

# make demo   installs what is missing, starts Docker and Redis, runs the MapReduce example
# make test   the same set-up (and Kubernetes, CoreDNS and helm built from source, once), then every test
VENV ?= .venv
PY := $(VENV)/bin/python
AGENTAINER := $(VENV)/bin/agentainer

.PHONY: controller-image helm manifests demo test test-unit setup docker redis image venv bench lint clean crds cluster cluster-down cluster-install controller kube coredns

demo:
	scripts/setup.sh demo
	PYTHON=$(PY) scripts/setup.sh redis
	$(AGENTAINER) run examples/mapreduce.yaml

test: setup kube coredns helm
	$(VENV)/bin/ruff check controller tests benchmarks scripts
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	$(PY) -m pytest tests

test-unit: venv
	$(PY) -m pytest tests/unit

setup:
	scripts/setup.sh all

docker:
	scripts/setup.sh docker

redis:
	PYTHON=$(PY) scripts/setup.sh redis

image:
	scripts/setup.sh image

venv:
	scripts/setup.sh venv

crds: venv
	$(PY) -m controller.crds
	$(MAKE) manifests

api-docs: venv
	$(PY) scripts/api_reference.py

kube:
	scripts/build-kube.sh >/dev/null

coredns:
	scripts/build-coredns.sh >/dev/null

helm:
	scripts/build-helm.sh >/dev/null

manifests: helm
	scripts/render-manifests.sh

cluster: setup kube coredns
	$(PY) scripts/cluster.py up --node

cluster-install: cluster helm
	PYTHON=$(PY) scripts/install-local.sh

cluster-down:
	$(PY) scripts/cluster.py down

controller: setup redis
	KUBECONFIG=$${KUBECONFIG:-$$HOME/.cache/agentainer/cluster/kubeconfig} $(AGENTAINER) controller

controller-image: setup
	PYTHON=$(PY) scripts/build-controller-image.sh

bench: setup redis
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/pool.py
	$(PY) benchmarks/fan_out.py

bench-cluster: cluster
	$(PY) scripts/cluster.py load agentainer/busybox:latest
	eval "$$($(PY) scripts/cluster.py env)" && $(PY) benchmarks/throughput.py

lint: venv
	$(VENV)/bin/ruff check controller tests benchmarks scripts
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache images/busybox/busybox

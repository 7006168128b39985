# The two commands of the README. Both set up what they need first.
#   make demo  - set up, then run atlasd's main job on its built-in default
#   make test  - set up, build/cache the real components and images, then ruff, mypy, pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup components image kind kind-down demo test lint typecheck unit integration proto clean

$(BIN)/atlasd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/atlasd

components: setup
	$(BIN)/python tests/harness/components.py install

# The images the charts run (atlasd from the Dockerfile, CoreDNS, Envoy, pause), built
# with podman on a Debian base and cached by content (tests/harness/images.py), and the
# kind node image (tests/harness/kind.py).
image: components
	$(BIN)/python tests/harness/images.py build
	$(BIN)/python tests/harness/kind.py image

# A kind cluster (`atlasd-dev`) from a node image built here (tests/harness/kind.py), the
# atlasd and CoreDNS images loaded into it and the chart installed in `monitoring`; see
# docs/operations.md, "Develop against kind". `make kind-down` deletes it.
kind: image
	$(BIN)/python tests/harness/kind.py up

kind-down: setup
	$(BIN)/python tests/harness/kind.py down

# Thanos (built from its Go module once, a few minutes) for the demo's sidecars and Query.
demo: setup
	@$(BIN)/python tests/harness/components.py install prometheus || \
	  echo "note: could not install Prometheus; the demo runs without it"
	@out=$$($(BIN)/python tests/harness/components.py path thanos) && \
	  thanos=$$(printf '%s\n' "$$out" | tail -n 1) || \
	  { echo "note: could not build Thanos; the demo runs without Thanos Query"; thanos=; }; \
	$(BIN)/atlasd demo $${thanos:+--thanos "$$thanos"}

lint: setup
	$(BIN)/ruff check atlasd tests bench
	$(BIN)/ruff format --check atlasd tests bench

typecheck: setup
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

unit: setup
	$(BIN)/pytest tests/unit -q

test: components image lint typecheck
	bash scripts/pytest-all

# Python types and the grpclib service of Thanos's Info API (proto/, vendored from Thanos
# v0.39.2) for the downstream-fleet simulator, generated with betterproto and checked in.
PROTO_INCLUDE = $(shell $(BIN)/python -c "import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__) + '/_proto')")
proto: setup
	$(BIN)/pip install -q 'betterproto[compiler]==2.0.0b7' 'grpcio-tools>=1.60'
	rm -rf atlasd/thanospb && mkdir -p atlasd/thanospb
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc \
	  -Iproto/thanos -Iproto -I$(PROTO_INCLUDE) \
	  --python_betterproto_out=atlasd/thanospb \
	  info/infopb/rpc.proto store/labelpb/types.proto

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

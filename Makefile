# The two commands of the README: `make run` and `make test`.
# Each creates the virtual environment and installs what it needs, Debian
# packages included when running as root, so a fresh clone works as it is.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= onnxruntime,openvino,opencl,display,dask,bench,dev
# Debian packages the tests and the embedded default need (installed as root only);
# PoCL from Debian knows CPUs that the PoCL inside the pyopencl wheel (LLVM 14) cannot build for.
# dcmtk (storescu, storescp, echoscu) and prometheus (promtool) are the DICOM node's and the
# exporter's independent peers in the tests; systemd (systemd-analyze only: it is not
# booted) and python3-seccomp check the unit.
DEBS   := xvfb libgl1-mesa-dri libglx-mesa0 libegl-mesa0 pocl-opencl-icd dcmtk prometheus \
          systemd python3-seccomp

.PHONY: run test test-full lint bench clean

run: $(VENV)/.installed
	$(BIN)/echod run

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests hil_tests -m "not full"

test-full: $(VENV)/.installed  # the paper-size runs: a 50,000 x 40,000 slide, a 305-slice CT
	$(BIN)/python -m pytest tests -m full

lint: $(VENV)/.installed
	$(BIN)/ruff check daemon tests hil_tests bench .ci
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python bench/ring_hop.py
	$(BIN)/python bench/live_pipeline.py

$(VENV)/.installed: pyproject.toml
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info

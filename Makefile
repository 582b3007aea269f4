# Label Sentinel: `make run` starts the MONAI Label server on demo studies; `make test` runs the tests.
# Both create the virtualenv and install what they need on first use; re-runs are fast.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_STUDIES := sample-apps/studies
STUDIES ?= $(DEMO_STUDIES)
HOST ?= 127.0.0.1
PORT ?= 8000
CONF ?=
export PYTHONPATH := $(CURDIR)
export SAM2_BUILD_CUDA := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run run-dicom test bench venv sample-data clean-venv

# The virtualenv is rebuilt when the pinned requirements or pyproject.toml change.
$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Label Sentinel needs Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing torch (first install takes a few minutes) =="
	$(PIP) install -q setuptools==84.2.1 wheel==0.48.0 $$(grep -E '^(torch|torchvision|numpy)==' requirements.lock)
	@echo "== installing pinned dependencies =="
	$(PIP) install -q --no-build-isolation -r requirements.lock
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import labelsentinel.models, labelsentinel.strategies, monailabel, monai; print('installed: monailabel', monailabel.__version__, 'monai', monai.__version__)"
	@touch $@

venv: $(VENV)/.installed

# Demo studies are generated for the default demo folder only: `make run STUDIES=/your/folder` serves your folder
# as it is (`labelsentinel serve` stops with a message when it is missing or empty) and never writes into it.
# `make sample-data [STUDIES=DIR]` asks for them explicitly; `labelsentinel sample-data` refuses a folder that holds
# other data and never overwrites a file.
ifeq ($(abspath $(STUDIES)),$(abspath $(DEMO_STUDIES)))
DEMO_DATA := $(STUDIES)/label_names.json
else
DEMO_DATA :=
endif

$(STUDIES)/label_names.json: | $(VENV)/.installed
	$(VENV)/bin/labelsentinel sample-data --out $(STUDIES)

sample-data: $(STUDIES)/label_names.json

run: $(VENV)/.installed $(DEMO_DATA)
	@$(PY) -m labelsentinel.serve --app apps/sentinel --studies $(STUDIES) --host $(HOST) --port $(PORT) $(CONF)

# Orthanc (Debian packages orthanc + orthanc-dicomweb, installed with apt-get if missing) on a free loopback
# port, the studies stored in it as DICOM CT series with their pseudo-labels imported, the server on its DICOMweb.
run-dicom: $(VENV)/.installed $(DEMO_DATA)
	@$(PY) -m labelsentinel.cli run-dicom --studies $(STUDIES) --host $(HOST) --port $(PORT) $(CONF)

test: $(VENV)/.installed
	$(PY) -m pytest -ra tests

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

clean-venv:
	rm -rf $(VENV)

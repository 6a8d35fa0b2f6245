# Two commands on a fresh Debian/Ubuntu machine with Python 3.11+:
#   make demo   install, build a demo model if none is configured, run the worker with a PACS
#   make test   install with all extras and test tools, then ruff, mypy and the whole suite
#   make test-unit   the quick loop: every test not marked integration (pytest -m "not integration")
#   make docs        the documentation site (MkDocs, --strict: a broken link or a missing page fails)
#   make config-docs regenerate docs/configuration.md and the example configs from the settings classes
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SYSTEM_PACKAGES := dcmtk orthanc orthanc-dicomweb dicom3tools openssl systemd chromium chromium-driver postgresql prometheus haproxy
SYSTEM_TOOLS := /usr/bin/storescu /usr/bin/storescp /usr/bin/dciodvfy /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/openssl /usr/bin/systemd-analyze /usr/bin/chromium /usr/bin/chromedriver /usr/bin/pg_ctlcluster /usr/bin/promtool /usr/sbin/haproxy

.PHONY: demo test test-unit install-train install-dev system-deps lint clean docs config-docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install-train: $(PY)
	$(PIP) install --quiet -e '.[train]' pydicom-data

install-dev: $(VENV)/.dev-installed

# Editable install: code changes need no reinstall, only a changed pyproject.toml does.
$(VENV)/.dev-installed: pyproject.toml | $(PY)
	@# The base is now onnxruntime (CPU); a venv from before holds onnxruntime-gpu, which writes the
	@# same package folder: both go, and the install below puts the CPU build back whole.
	if $(PIP) show -q onnxruntime-gpu 2>/dev/null; then $(PIP) uninstall -y -q onnxruntime-gpu onnxruntime; fi
	$(PIP) install --quiet -e '.[dev]'
	touch $@

# As root, install the Debian packages the tests and the demo use; otherwise say exactly what to run.
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do [ -e $$t ] || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(SYSTEM_PACKAGES) (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "missing:$$missing"; echo "run: sudo apt-get install -y $(SYSTEM_PACKAGES)"; \
	    if [ "$${CI:-}" = true ]; then exit 1; fi; \
	  fi; \
	fi

lint: install-dev
	$(VENV)/bin/ruff check cxr_contract worker trainer cxr_demo tests benchmarks scripts
	$(VENV)/bin/mypy

# Three pytest processes: TensorFlow keeps what each in-process fit and export allocated until
# its process ends, and the whole suite in one process passed this machine's 24 GiB (OOM-killed
# in the trainer pipeline module, measured on a clean clone). The trainer pipeline trains its
# own model, so only the worker-facing integration run trains the shared test model.
test: system-deps install-dev lint docs
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration"
	$(PY) -m pytest -q -p no:cacheprovider -m integration --ignore=tests/integration/test_trainer_pipeline.py
	$(PY) -m pytest -q -p no:cacheprovider tests/integration/test_trainer_pipeline.py

# Unit tests only (the few that call dciodvfy, hadolint or systemd-analyze are marked `tool`:
# add PYTEST_ARGS='-m "not integration and not tool"' to skip them as well).
test-unit: install-dev
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration" $(PYTEST_ARGS)

# The site goes to build/site; the benchmark tables are generated from benchmarks/results/*.json
# at build time (scripts/mkdocs_hooks.py), the configuration page by `make config-docs`.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

config-docs: install-dev
	$(PY) scripts/config_docs.py

demo: install-train
	@if [ "$$(id -u)" = 0 ] && [ ! -x /usr/sbin/Orthanc ]; then $(MAKE) --no-print-directory system-deps; fi
	$(PY) -m cxr_demo.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info

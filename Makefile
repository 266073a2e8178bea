# Project-local virtualenv at .venv; `make serve` runs the server on the bundled model, `make test` the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test test-gpu clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints-cpu.txt -e '.[server,train,dev]'
	touch $(STAMP)

install: $(STAMP)

# The bundled model, with its Shakespeare-style adapter selectable as "model": "shakespeare".
serve: $(STAMP)
	$(VENV)/bin/ember serve --enable-lora --lora-root models --lora shakespeare=ember-stories-shakespeare

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu and not slow" --timeout 600

test-gpu:
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV)

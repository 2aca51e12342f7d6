VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml scripts/setup.sh
	REGATE_VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/regate demo

test: setup
	$(PY) -m pytest -q

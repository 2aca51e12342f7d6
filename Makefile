VENV ?= .venv
LLAVA_VENV ?= .venv-llava
PY := $(VENV)/bin/python

.PHONY: setup demo test lint
setup: $(VENV)/.ready $(LLAVA_VENV)/.ready

$(VENV)/.ready: pyproject.toml scripts/setup.sh
	REGATE_VENV=$(VENV) bash scripts/setup.sh
	touch $@

# The upstream-LLaVA env: the real llava-torch on transformers 4.37.2, for the parity and launcher tests.
$(LLAVA_VENV)/.ready: pyproject.toml scripts/setup_llava_env.sh
	REGATE_LLAVA_VENV=$(LLAVA_VENV) bash scripts/setup_llava_env.sh
	touch $@

demo: $(VENV)/.ready
	$(VENV)/bin/regate demo

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(PY) -m pytest -q

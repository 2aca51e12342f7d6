VENV ?= .venv
LLAVA_VENV ?= .venv-llava
VIDEOLLAMA2_VENV ?= .venv-videollama2
PY := $(VENV)/bin/python

.PHONY: setup demo test lint
setup: $(VENV)/.ready $(LLAVA_VENV)/.ready $(VIDEOLLAMA2_VENV)/.ready

$(VENV)/.ready: pyproject.toml scripts/setup.sh scripts/venv.sh
	REGATE_VENV=$(VENV) bash scripts/setup.sh
	touch $@

# The upstream-LLaVA env: the real llava-torch on transformers 4.37.2 (constraints/llava.txt), for the parity and launcher tests.
$(LLAVA_VENV)/.ready: pyproject.toml scripts/setup_llava_env.sh scripts/venv.sh constraints/llava.txt
	REGATE_LLAVA_VENV=$(LLAVA_VENV) bash scripts/setup_llava_env.sh
	touch $@

# The VideoLLaMA2-pinned env: constraints/videollama2.txt (transformers 4.40.0, accelerate 0.26.1, peft 0.4.0, numpy 1.24.4).
$(VIDEOLLAMA2_VENV)/.ready: pyproject.toml scripts/setup_videollama2_env.sh scripts/venv.sh constraints/videollama2.txt
	REGATE_VIDEOLLAMA2_VENV=$(VIDEOLLAMA2_VENV) bash scripts/setup_videollama2_env.sh
	touch $@

demo: $(VENV)/.ready
	$(VENV)/bin/regate demo

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(PY) -m pytest -q

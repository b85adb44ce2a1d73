# cllm: two commands for a new user — `make install && make demo`, and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cllm-installed
PYTEST := $(PY) -m pytest

.PHONY: install demo test test-slow test-all lint format gen bench clean recipes-check

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(PYTEST) -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy src/cllm/core src/cllm/formats

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench scripts
	$(VENV)/bin/ruff format src tests bench scripts

gen: $(STAMP)
	$(PY) -m cllm.gen

# every recipe in docs/recipes/ on a shortened setting: report written, re-run is a no-op,
# a rebuilt output has the same sha256
recipes-check: $(STAMP)
	$(PY) scripts/recipes_check.py

bench: $(STAMP)
	$(PY) bench/eval_speed.py

clean:
	rm -rf demo-out recipes-check .pytest_cache .mypy_cache .ruff_cache

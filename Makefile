# The two commands of the README. Both create .venv on first use (scripts/bootstrap.sh).
PY := .venv/bin/python
ARGS ?=

.PHONY: train test env

train: env  ## the built-in default job (digits), or: make train ARGS="--config configs/x.yaml"
	$(PY) fdfo/train.py $(ARGS)

test: env  ## the whole test suite
	$(PY) -m pytest tests -q $(ARGS)

env:
	@bash scripts/bootstrap.sh

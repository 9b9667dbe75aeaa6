# The two commands of the README. Both create .venv on first use (scripts/bootstrap.sh).
PY := .venv/bin/python
ARGS ?=
# Test files run on JOBS parallel workers (a file's tests stay on one worker); JOBS=0 runs them
# all in this process.
JOBS ?= 2

.PHONY: train test env

train: env  ## the built-in default job (digits), or: make train ARGS="--config configs/x.yaml"
	$(PY) fdfo/train.py $(ARGS)

test: env  ## the whole test suite
	$(PY) -m pytest tests -q -n $(JOBS) --dist loadfile $(ARGS)

env:
	@bash scripts/bootstrap.sh

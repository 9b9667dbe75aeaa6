# The two commands of the README. Both create .venv on first use (scripts/bootstrap.sh), with the
# exact versions of locks/cpu.txt.
PY := .venv/bin/python
ARGS ?=
# Test files run on JOBS parallel workers (a file's tests stay on one worker); JOBS=0 runs them
# all in this process.
JOBS ?= 2

.PHONY: train test env lock smoke

train: env  ## the built-in default job (digits), or: make train ARGS="--config configs/<name>.yaml"
	$(PY) fdfo/train.py $(ARGS)

test: env  ## the whole test suite
	$(PY) -m pytest tests -q -n $(JOBS) --dist loadfile $(ARGS)

env:
	@bash scripts/bootstrap.sh

lock:  ## resolve the newest releases setup.py allows in a new environment, and make them the lock
	rm -rf .venv-lock
	FDFO_VENV=.venv-lock FDFO_RESOLVE=latest bash scripts/bootstrap.sh
	.venv-lock/bin/python scripts/lock.py freeze locks/cpu.txt
	.venv-lock/bin/python scripts/lock.py gpu locks/cpu.txt locks/gpu.txt
	rm -rf .venv-lock

smoke:  ## the newest releases setup.py allows, in a new environment (.venv-latest): the smoke tests
	rm -rf .venv-latest
	FDFO_VENV=.venv-latest FDFO_RESOLVE=latest bash scripts/bootstrap.sh
	.venv-latest/bin/python -m pytest tests -q -m smoke -n $(JOBS) --dist loadfile $(ARGS)

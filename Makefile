# Every target installs what it needs first; all are idempotent.
VENV := .venv
PY   := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all install install-test demo test bench clean

all: install

install:
	@scripts/install.sh

install-test:
	@scripts/install.sh --test

demo: install install-test
	@scripts/demo.sh

test: install-test
	$(PY) -m pytest -n 2 -q -p no:cacheprovider tests

bench: install-test
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info demo bench/work

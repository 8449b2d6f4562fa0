# Every target installs what it needs first; all are idempotent.
VENV := .venv
PY   := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all install uninstall install-test demo test soak soak-hostile-write bench docs man clean

all: install

# The venv (on Debian's /usr/bin/python3) and /usr/local/bin/qcowfs, so that
# `qcowfs` runs by name for every user and `mount -t fuse.qcowfs` finds it; the
# manual page (`man qcowfs`) and the bash completion under /usr/local/share.
install:
	@scripts/install.sh --system

uninstall:
	@scripts/install.sh --uninstall

install-test:
	@scripts/install.sh --test

demo: install install-test
	@scripts/demo.sh

test: install-test
	$(PY) -m pytest -n 2 -q -p no:cacheprovider tests

# The model-based test (tests/test_model.py) for SOAK_MINUTES minutes, then HOSTILE_WRITE_CASES
# cases of the writable hostile-image suite (tests/hostile_write.py); not part of `make test`.
SOAK_MINUTES ?= 30
HOSTILE_WRITE_CASES ?= 3000
soak: install-test
	SOAK_MINUTES=$(SOAK_MINUTES) HOSTILE_WRITE_CASES=$(HOSTILE_WRITE_CASES) scripts/soak.sh

# The writable hostile-image suite alone: HOSTILE_WRITE_CASES cases from seed HOSTILE_WRITE_START.
HOSTILE_WRITE_START ?= 0
soak-hostile-write: install-test
	$(PY) tests/hostile_write.py --cases $(HOSTILE_WRITE_CASES) --start $(HOSTILE_WRITE_START) --jobs 2

bench: install-test
	$(PY) bench/run.py

# The API reference, from the docstrings (pdoc): docs/api/index.html. The
# public API first, then every layer (tests/test_docs.py builds the same).
DOC_MODULES := qcowfs qcowfs.api qcowfs.aio qcowfs.records qcowfs.errors qcowfs.format qcowfs.host \
               qcowfs.engine qcowfs.fs qcowfs.service qcowfs.cli
docs: install-test
	$(PY) -m pdoc --docformat markdown -o docs/api $(DOC_MODULES)

# qcowfs(1) (man/qcowfs.1) and the bash completion (completion/qcowfs.bash), made from
# the command line's parser; tests/test_manpage.py fails while they are out of date.
man: install-test
	$(PY) scripts/generate.py

clean:
	rm -rf $(VENV) build *.egg-info demo bench/work docs/api

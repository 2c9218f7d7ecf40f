# Set-up is two commands: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test data lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

data:
	@sh scripts/ensure-data.sh

demo: $(STAMP) data
	$(VENV)/bin/otfuse demo

# in parallel, one worker per core, a file per worker at a time (tests/conftest.py); `-n 0`: serial
test: $(STAMP) data
	$(PY) -m pytest -q -n auto --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check otfuse tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/fuse_vgg11.py

clean:
	rm -rf $(VENV) build *.egg-info

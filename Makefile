# Two commands do the whole set-up on a fresh machine: `make demo` and `make test`.
# .venv is created once; the install step reruns only when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Flower (the `flower` extra) pins typer < 0.21, rich < 15, starlette < 1.4, uvicorn < 0.50 and packaging < 26,
# older than partita uses, so it cannot join `dev`. Its test runs in an overlay: a venv that sees .venv's
# packages (a .pth line) and holds only Flower and its pins, which take precedence there; .venv is untouched.
FLOWER_VENV := .venv-flower
FLOWER_PY := $(FLOWER_VENV)/bin/python
FLOWER_STAMP := $(FLOWER_VENV)/.installed

.PHONY: demo test lint typecheck bench clean browser

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(FLOWER_STAMP): $(STAMP)
	rm -rf $(FLOWER_VENV)
	$(PY) -m venv --without-pip $(FLOWER_VENV)
	$(PY) -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
		> "$$($(FLOWER_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/partita-base.pth"
	$(PY) -c 'import subprocess, sys, tomllib; extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["flower"]; subprocess.check_call([sys.executable, "-m", "pip", "--python", "$(FLOWER_PY)", "install", "-q", *extra])'
	touch $(FLOWER_STAMP)

demo: $(STAMP)
	$(VENV)/bin/partita demo

lint: $(STAMP)
	$(VENV)/bin/ruff check partita tests benchmarks examples

typecheck: $(STAMP)
	$(PY) -m mypy

# The dashboard's browser test drives Debian's chromium (Playwright with the system browser). Install
# it where we can (root and apt-get); elsewhere the test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "could not install chromium; the dashboard's browser test will skip"; \
	fi

test: lint typecheck browser $(FLOWER_STAMP)
	$(PY) -m pytest -q
	$(FLOWER_PY) -m pytest -q -p no:cacheprovider tests/test_fl_flower.py

clean:
	rm -rf $(VENV) $(FLOWER_VENV) build *.egg-info partita-demo.png partita-demo.json

# Two commands do the whole set-up on a fresh machine: `make demo` and `make test`.
# .venv is created once; the install step reruns only when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean browser

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

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

test: lint typecheck browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info partita-demo.png partita-demo.json

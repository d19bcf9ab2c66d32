# Two commands do the whole set-up on a fresh machine: `make demo` and `make test`.
# .venv is created once; the install step reruns only when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

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

test: lint typecheck
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info partita-demo.png partita-demo.json

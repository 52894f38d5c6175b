# Quick start:  make run   (benchmark on the embedded glyphs dataset)
#               make test  (test suite)
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
METHOD ?= protonet,nearest_neighbor
SHOTS  ?= 5
ARGS   ?=

.PHONY: install run test test-slow bench report clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,ray]"
	$(PY) -m pip install -q --no-deps --config-settings=--build-option=build_ext learn2learn==0.2.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) run_benchmarks.py --method $(METHOD) --shots $(SHOTS) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(ARGS)

report: $(STAMP)
	$(PY) run_benchmarks.py --report

clean:
	rm -rf results/runs results/leaderboard.csv* results/table6.md results/leaderboard.png

# The two entry points of the README: `make run` (the whole pipeline on the
# embedded default) and `make test` (the whole test suite). Both create or
# refresh the virtual environment at .venv/ first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: venv run test test-fast bench reports clean-venv

venv: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: pip takes them
# from the wheels on this machine's disk instead of downloading a CUDA build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m stages pipeline

# two workers, each test file in one of them (its module fixtures built once)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

# the committed study reports, regenerated from their committed exports alone (no DVC
# experiment needed): the same bytes of results.md on any clone (figures may differ in rendering)
reports: $(STAMP)
	$(BIN)/dmp report --only-runs --runs reports/runs --params reports/study/params.yaml --reports reports/study
	$(BIN)/dmp report --only-runs --runs reports/photos/runs --params reports/photos/params.yaml --reports reports/photos

bench: $(STAMP)
	$(BIN)/dmp bench hog
	$(BIN)/dmp bench step --variant mamo
	$(BIN)/dmp bench step --variant denoising
	$(BIN)/dmp bench eval

clean-venv:
	rm -rf $(VENV)

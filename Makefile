# The two set-up commands of README.md:  `make repro` (main job) and `make test` (test suite).
# Both create .venv and install the pinned requirements on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# Commands the recipes run (dvc, python) come from the venv first.
ON_VENV := PATH="$(abspath $(VENV))/bin:$$PATH"
export YOLO_CONFIG_DIR := $(CURDIR)/.ultralytics
export DVC_NO_ANALYTICS := 1

.PHONY: repro test test-fast install sample pull

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade -r requirements.txt
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e .   # the charseg package and its `charseg` command
	$(VENV)/bin/pip check
	touch $@

sample: install
	$(PY) -m charseg sample --if-empty --out data/raw

# No videos of your own: the generated sample runs under the demo profile of params.sample.yaml (dvc exp run).
# Your own videos: plain dvc repro on params.yaml (a demo profile an earlier sample run left there is undone).
repro: sample
	@$(ON_VENV) $(PY) -m charseg sample --out data/raw --repro params.sample.yaml
	@echo "repro: done. Compare: charseg compare; reports/comparison.md; plots: dvc plots show"

# Share through the DVC remote (README "Share data and models"): the remote is checked before a pull.
pull: install
	@$(ON_VENV) $(PY) -m charseg remote check && $(ON_VENV) dvc pull

# The full suite, as CI runs it; test-fast skips the tests marked slow (real dvc/make runs, training) for the edit-test loop.
test: install
	YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 $(ON_VENV) $(PY) -m pytest -q tests

test-fast: install
	YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 $(ON_VENV) $(PY) -m pytest -q -m "not slow" tests

# The two set-up commands of README.md:  `make repro` (main job) and `make test` (test suite).
# Both create .venv and install the pinned requirements on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export YOLO_CONFIG_DIR := $(CURDIR)/.ultralytics
export DVC_NO_ANALYTICS := 1

.PHONY: repro test install sample

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade -r requirements.txt
	$(VENV)/bin/pip check
	touch $@

sample: install
	$(PY) -m stages.sample --if-empty --out data/raw

# No videos of your own: the generated sample runs under the demo profile of params.sample.yaml.
repro: sample
	@export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	if [ -f data/raw/videos/.charseg-sample.json ]; then \
		echo "repro: data/raw/videos holds the generated sample: dvc exp run with params.sample.yaml"; \
		dvc exp run $$(python -m stages.sample --print-overrides params.sample.yaml); \
	else \
		dvc repro; \
	fi
	@echo "repro: done. Comparison: reports/comparison.md; plots: plots/ (dvc plots show); metrics: dvc metrics show"

test: install
	YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

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

repro: sample
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	@echo "done: frames in data/frames, plots in plots/, metrics in metrics/ (dvc metrics show, dvc plots show)"

test: install
	YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

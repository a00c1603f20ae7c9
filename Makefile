# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds the virtual environment in .venv on first use (pinned by
# requirements.lock) and reuses it while pyproject.toml and the lock are unchanged.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

WORLD := data/world
DEMO_RUN := runs/demo

.PHONY: demo test install bench-data bench-model bench-train clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opt data synth --out $(WORLD) --train 4000 --val 400 --test 500 --test-novel 500 --seed 0 --workers 2
	$(BIN)/opt tokenizer train --data '$(WORLD)/train-*.tar' --out data/tokenizer.model --vocab-size 512
	$(BIN)/opt data check --config configs/tiny.yaml --data '$(WORLD)/val-*.tar'
	$(BIN)/opt data preview --data '$(WORLD)/test-*.tar' --out $(DEMO_RUN)/world_preview.png
	@echo "demo: world in $(WORLD), tokenizer in data/tokenizer.model, preview in $(DEMO_RUN)/world_preview.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-data: $(STAMP)
	$(BIN)/python scripts/bench_data.py

bench-model: $(STAMP)
	$(BIN)/python scripts/bench_model.py

bench-train: $(STAMP)
	$(BIN)/python scripts/bench_train.py

clean-demo:
	rm -rf $(WORLD) data/tokenizer.model $(DEMO_RUN)

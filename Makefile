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

# The whole pipeline on the embedded synthetic world. Each stage writes its output
# atomically and is skipped when that output exists; pretraining resumes from its
# newest checkpoint. `make clean-demo` starts over.
DEMO_CONFIG := configs/tiny.yaml
DEMO_VQ_STEPS := 600

demo: $(STAMP) $(DEMO_RUN)/report/report.md
	@echo "demo: report in $(DEMO_RUN)/report/report.md (model in $(DEMO_RUN)/model)"

# synth resumes by itself (finished shards are kept); the stamp marks a complete world
$(WORLD)/.complete: | $(STAMP)
	$(BIN)/opt data synth --out $(WORLD) --train 4000 --val 400 --test 500 --test-novel 500 --test-unseen 500 --seed 0 --workers 2
	$(BIN)/opt data preview --data '$(WORLD)/test-*.tar' --out $(DEMO_RUN)/world_preview.png
	touch $@

data/tokenizer.model: $(WORLD)/.complete
	$(BIN)/opt tokenizer train --data '$(WORLD)/train-*.tar' --out data/tokenizer.model --vocab-size 512

$(DEMO_RUN)/vq/metrics.json: $(WORLD)/.complete
	$(BIN)/opt vq train --config $(DEMO_CONFIG) --data '$(WORLD)/train-*.tar' --val '$(WORLD)/val-*.tar' \
		--out $(DEMO_RUN)/vq vq_train.steps=$(DEMO_VQ_STEPS)

$(DEMO_RUN)/model/config.json: data/tokenizer.model $(DEMO_RUN)/vq/metrics.json
	$(BIN)/opt train --config $(DEMO_CONFIG) --run-dir $(DEMO_RUN)/train train.vq_path=$(DEMO_RUN)/vq
	$(BIN)/opt export $(DEMO_RUN)/train --out $(DEMO_RUN)/model

$(DEMO_RUN)/report/report.md: $(DEMO_RUN)/model/config.json
	$(BIN)/opt eval --model $(DEMO_RUN)/model --data $(WORLD) --out $(DEMO_RUN)/report --run-dir $(DEMO_RUN)/train --rerank-k 10

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

# Two commands on a fresh machine: `make demo` (main job on the embedded synthetic data) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_data

.PHONY: install demo test test-slow bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the local CPU wheel; never a range (that pulls CUDA builds)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dgmrec-dgl data synth --out $(DEMO) --preset demo --quiet
	$(BIN)/dgmrec-dgl data mask $(DEMO) --ratio 2/3 --seed 2024
	$(BIN)/dgmrec-dgl data check $(DEMO) --mask $(DEMO)/missing_items_0.666.npz
	$(BIN)/dgmrec-dgl train --config configs/dgmrec/demo.yaml --data $(DEMO) \
		--mask $(DEMO)/missing_items_0.666.npz --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench-quick: $(STAMP)
	$(BIN)/python bench/graph_refinement.py --quick

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info

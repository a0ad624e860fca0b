# The commands README and CI call. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spherinator-installed
DEMO_DATA ?= data/demo
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: venv constraints demo demo-data test test-fast lint format bench gpu-check clean-demo aladin-lite

venv: $(STAMP)

# pyproject.toml declares ranges; constraints.txt pins the exact versions tested here (torch 2.14.1, ...).
# DeepSpeed ships only an sdist: it builds against the torch already in the venv (--no-build-isolation), which
# needs the build backends (hatchling + editables for spherinator, setuptools for DeepSpeed) in the venv.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt --upgrade pip setuptools wheel hatchling editables
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,data,wandb]'
	$(BIN)/pip install --quiet -c constraints.txt --no-build-isolation -e '.[deepspeed]'
	touch $(STAMP)

# After changing a dependency in pyproject.toml: pin what the venv now holds (then commit constraints.txt).
constraints: venv
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --all --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

$(DEMO_DATA)/_SUCCESS: | $(STAMP)
	$(BIN)/python tools/make_dataset.py synthetic --out $(DEMO_DATA) --count 2048 --size 128
	touch $@

demo-data: $(DEMO_DATA)/_SUCCESS

# A local copy of Aladin Lite (npm) for atlas pages that work offline and for the browser tests:
# spherinator atlas RUN --aladin-lite $(ALADIN_LITE)
ALADIN_LITE := $(VENV)/aladin-lite/node_modules/aladin-lite/dist/aladin.js
$(ALADIN_LITE):
	npm install --prefix $(VENV)/aladin-lite --no-audit --no-fund --loglevel=error aladin-lite@3.8.2

aladin-lite: $(ALADIN_LITE)

# The demo ends on the sphere: the atlas of the run just trained (HiPS orders 0..4, every row in the catalog),
# and the one line that opens it.
DEMO_ATLAS_ORDER ?= 4
demo: venv demo-data
	$(BIN)/spherinator fit -c experiments/vae_cnn3.yaml -c experiments/demo.yaml
	@echo "Logs, checkpoints and pictures: runs/demo  (view with: $(BIN)/tensorboard --logdir runs)"
	@run=$$(ls -d runs/demo/version_* | sort -V | tail -1) && \
	$(BIN)/spherinator atlas $$run --max-order $(DEMO_ATLAS_ORDER) && \
	echo "Open the sphere: $(BIN)/spherinator atlas serve $$run/atlas  (then the address it prints)"

test: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/pytest -m "not slow and not slurm" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv
	$(BIN)/python tools/bench/bench_data.py
	$(BIN)/python tools/bench/bench_fit.py
	$(BIN)/python tools/bench/bench_onnx.py
	$(BIN)/python tools/bench/bench_startup.py
	$(BIN)/python tools/bench/bench_atlas.py
	$(BIN)/python tools/bench/bench_sphere.py

# One CUDA GPU, under 8 minutes: the demo recipe in bf16-mixed and 32, DeepSpeed stage 2, pinned memory, ONNX
# Runtime on CUDA (README "GPU check"). `python tools/bench/gpu_check.py --cpu` is the reduced mode CI runs.
gpu-check: venv
	$(BIN)/python tools/bench/gpu_check.py

clean-demo:
	rm -rf $(DEMO_DATA) runs/demo

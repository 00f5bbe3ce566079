# The real path on a GPU box with Kaggle credentials:   make data train eval   (MODEL=a|b, NPROC=N GPUs)
# A fresh machine, no GPU, no data:                     make quickstart ; make test
#
# Which Python: PYTHON=... when given; else the active virtual environment or conda
# environment; else .venv, created with python3 on first use (a stock Debian/Ubuntu has
# no `python` and its system pip refuses to install: PEP 668).
ifeq ($(origin PYTHON),undefined)
  ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
    PYTHON := python
  else
    PYTHON := .venv/bin/python
    SETUP := .venv/installed
  endif
endif
SOURCE ?= kaggle
# The face data set prepare_data.py downloads with SOURCE=kaggle: rafdb or fer2013.
FACES ?= rafdb
MODEL ?= b
NPROC ?= 1
ARGS ?=
IMAGE ?=
TEXT ?=
QUICK := data/synthetic
QUICK_TRAIN := --data $(QUICK)/processed --no-pretrained --input-size 48 --overwrite
QUICK_FUSED := $(QUICK_TRAIN) --trunk-from checkpoints/quickstart_a_image/best.pt --lr 5e-4 --warmup 100 --modality-dropout 0.2
QUICK_EVAL := --data $(QUICK)/processed --results results/quickstart.csv
ifeq ($(NPROC),1)
  TRAIN := $(PYTHON) train.py
else
  TRAIN := $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) train.py
endif

.PHONY: install ready data train eval demo bench gpu-check test test-fast quickstart fer fer-eval fer-goemotions clean

# .venv: made once, and the requirements installed again whenever requirements.txt changes.
# A .venv without a working pip (made where python3-venv was missing) is removed, not reused.
.venv/installed: requirements.txt
	@if test -e .venv && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then \
	  echo "note: .venv has no working pip (made without python3-venv?): removing it and making it again" >&2; \
	  rm -rf .venv; fi
	test -x .venv/bin/python || python3 -m venv .venv || { rm -rf .venv; echo "error: 'python3 -m venv' failed: install it (Debian/Ubuntu: sudo apt install python3-venv) or activate an environment" >&2; exit 2; }
	.venv/bin/python -m pip install --quiet --requirement requirements.txt
	touch $@

# In an active environment `make install` changes that environment (it pins
# opencv-python-headless<5 and kaggle<2.3 there), so it says so first; `make quickstart`
# installs only when an import is missing.
ifdef SETUP
install: $(SETUP)
ready: $(SETUP)
else
install:
	@echo "note: installing requirements.txt into the active environment ($(VIRTUAL_ENV)$(CONDA_PREFIX)): opencv-python-headless<5 and kaggle<2.3 there" >&2
	$(PYTHON) -m pip install --quiet --requirement requirements.txt
ready:
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
	  torch torchvision numpy PIL tokenizers sklearn matplotlib tqdm cv2 kaggle six pytest \
	  || $(MAKE) --no-print-directory install
endif

# --faces only with the download: prepare_data.py refuses a flag its source does not read.
data: $(SETUP)
	$(PYTHON) prepare_data.py --source $(SOURCE) $(if $(filter kaggle,$(SOURCE)),--faces $(FACES))

train: $(SETUP)
	$(TRAIN) --model $(MODEL) $(ARGS)

eval: $(SETUP)
	$(PYTHON) evaluate.py --checkpoint checkpoints/model_$(MODEL)/best.pt --ablate

# Either input alone is enough; with neither, say how to give them (before any install).
ifeq ($(strip $(IMAGE)$(TEXT)),)
demo:
	@echo 'error: give a photo, a sentence or both: make demo IMAGE=face.jpg TEXT="so happy today"' >&2; exit 2
else
demo: $(SETUP)
	$(PYTHON) demo.py$(if $(IMAGE), --image "$(IMAGE)")$(if $(TEXT), --text "$(TEXT)")
endif

bench: $(SETUP)
	$(PYTHON) bench.py

# Everything that needs a CUDA GPU, at the real size on synthetic faces: results/gpu-check.json
gpu-check: $(SETUP)
	$(PYTHON) gpu_check.py

test: $(SETUP)
	$(PYTHON) -m pytest -q tests

# The inner loop: every test but those marked slow (the marker's description in
# tests/conftest.py says which kinds).
test-fast: $(SETUP)
	$(PYTHON) -m pytest -q -m "not slow" tests

# Synthetic data, no download, minutes on a laptop CPU. A trunk learns the faces first (Model
# A's image-only baseline, fine-tuned at input 48); the fused models and Model B train on its
# cached features; the text-only baseline beside them; a comparison table with 95 % intervals,
# Model B's ablation, and the demo on a real photo with its explanation.
quickstart: ready
	$(PYTHON) prepare_data.py --source synthetic --raw-dir $(QUICK)/raw --out $(QUICK)/processed
	$(PYTHON) train.py --model a --run-name quickstart_a_image --modality image --finetune-backbone $(QUICK_TRAIN) --epochs 8 --lr 1e-3 --cosine --warmup 50 --label-smoothing 0.1
	$(PYTHON) train.py --model a --run-name quickstart_a_text --modality text $(QUICK_TRAIN) --epochs 8 --lr 5e-4 --warmup 100
	$(PYTHON) train.py --model a --run-name quickstart_a $(QUICK_FUSED) --epochs 8
	$(PYTHON) train.py --model b --run-name quickstart_b $(QUICK_FUSED) --epochs 4
	rm -f results/quickstart.csv
	$(PYTHON) evaluate.py --checkpoint checkpoints/quickstart_a_image/best.pt $(QUICK_EVAL)
	$(PYTHON) evaluate.py --checkpoint checkpoints/quickstart_a_text/best.pt $(QUICK_EVAL)
	$(PYTHON) evaluate.py --checkpoint checkpoints/quickstart_a/best.pt $(QUICK_EVAL)
	$(PYTHON) evaluate.py --checkpoint checkpoints/quickstart_b/best.pt $(QUICK_EVAL) --ablate
	$(PYTHON) demo.py --checkpoint checkpoints/quickstart_b/best.pt --image tests/fixtures/astronaut.jpg --text "honestly i feel so happy and proud today" --explain results/explain.png

# The FER2013 recipe on 2 CPU cores (README, "Real faces on a CPU"). No ImageNet weights
# offline, so the trunk learns from random weights in stages: an image-only run fine-tunes it;
# text-only runs train each model's text branch; the fused runs start from both and train on
# the trunk's frozen, cached features. A run whose best.pt exists is not trained again.
FER_DATA := data/fer
FER_RUNS := checkpoints/fer
FER_SEEDS := 0 1 2
FER_PREPARE = $(PYTHON) prepare_data.py --image-dir $(FER) --text-csv $(TEXTS) --image-size 48 --raw-dir $(FER_DATA)/raw
FER_TRAIN = $(PYTHON) train.py --data $(FER_DATA)/processed --out $(FER_RUNS) --no-pretrained --input-size 64 --cosine
FER_FUSED = --trunk-from $(FER_RUNS)/a_image/best.pt --lr 5e-4 --warmup 200
FER_FUSED_RUNS := $(foreach s,$(FER_SEEDS),a_fused_s$(s) b_fused_s$(s))
FER_EVAL = $(PYTHON) evaluate.py --data $(FER_DATA)/processed --results results/fer.csv
FER_DEDUPE = $(PYTHON) evaluate.py --data $(FER_DATA)/dedupe --results results/fer-dedupe.csv

fer: $(FER_FUSED_RUNS:%=$(FER_RUNS)/%/best.pt) fer-eval

$(FER_DATA)/processed/meta.json: $(SETUP)
	@test -n "$(FER)" -a -n "$(TEXTS)" || { echo 'error: give both data sets: make fer FER=path/to/fer2013 TEXTS=path/to/emotions.txt' >&2; exit 2; }
	$(FER_PREPARE) --out $(FER_DATA)/processed
	$(FER_PREPARE) --out $(FER_DATA)/dedupe --dedupe

$(FER_RUNS)/a_image/best.pt: $(FER_DATA)/processed/meta.json
	$(FER_TRAIN) --model a --run-name a_image --modality image --finetune-backbone --overwrite \
	  --epochs 20 --lr 1e-3 --warmup 300 --label-smoothing 0.1

$(FER_RUNS)/a_text/best.pt: $(FER_DATA)/processed/meta.json
	$(FER_TRAIN) --model a --run-name a_text --modality text --modality-dropout 0 --overwrite \
	  --epochs 15 --lr 5e-4 --warmup 200 --label-smoothing 0.1 --batch-size 32 --embed-dropout 0.3

$(FER_RUNS)/b_text/best.pt: $(FER_DATA)/processed/meta.json
	$(FER_TRAIN) --model b --run-name b_text --modality text --modality-dropout 0 --overwrite \
	  --epochs 10 --lr 5e-4 --warmup 200 --text-dropout 0.3 --embed-dropout 0.1

$(FER_RUNS)/a_fused_s%/best.pt: $(FER_RUNS)/a_image/best.pt $(FER_RUNS)/a_text/best.pt
	$(FER_TRAIN) --model a --run-name a_fused_s$* --seed $* $(FER_FUSED) --overwrite \
	  --text-from $(FER_RUNS)/a_text/best.pt --epochs 5

$(FER_RUNS)/b_fused_s%/best.pt: $(FER_RUNS)/a_image/best.pt $(FER_RUNS)/b_text/best.pt
	$(FER_TRAIN) --model b --run-name b_fused_s$* --seed $* $(FER_FUSED) --overwrite \
	  --text-from $(FER_RUNS)/b_text/best.pt --epochs 3

# Every run on test (results/fer.csv; --tta where a face is read), the seed-0 runs on the
# deduplicated test (results/fer-dedupe.csv), each fused model's ensemble of seeds, and fused
# Model B's ablation.
fer-eval: $(SETUP)
	rm -f results/fer.csv results/fer-dedupe.csv
	for run in a_image a_text b_text $(FER_FUSED_RUNS); do \
	  $(FER_EVAL) --checkpoint $(FER_RUNS)/$$run/best.pt || exit; done
	for run in a_image $(FER_FUSED_RUNS); do \
	  $(FER_EVAL) --checkpoint $(FER_RUNS)/$$run/best.pt --tta || exit; done
	for run in a_text b_text; do \
	  $(FER_DEDUPE) --checkpoint $(FER_RUNS)/$$run/best.pt || exit; done
	for run in a_image a_fused_s0 b_fused_s0; do \
	  $(FER_DEDUPE) --checkpoint $(FER_RUNS)/$$run/best.pt --tta || exit; done
	for model in a b; do \
	  $(FER_EVAL) --checkpoint $(foreach s,$(FER_SEEDS),$(FER_RUNS)/$${model}_fused_s$(s)/best.pt) || exit; \
	  $(FER_EVAL) --checkpoint $(foreach s,$(FER_SEEDS),$(FER_RUNS)/$${model}_fused_s$(s)/best.pt) --tta || exit; \
	done
	$(FER_EVAL) --checkpoint $(FER_RUNS)/b_fused_s0/best.pt --ablate

# The same faces with GoEmotions' sentences (Ekman's seven classes, so Disgust and Neutral faces
# get sentences of their own): a text-only and a fused Model A on the FER2013 trunk.
# make fer-goemotions FER=path/to/fer2013 GOEMOTIONS=path/to/goemotions/train.tsv
GO_DATA := data/fer-goemotions/processed
GO_RUNS := checkpoints/fer-goemotions
GO_TRAIN = $(PYTHON) train.py --data $(GO_DATA) --out $(GO_RUNS) --no-pretrained --input-size 64 --cosine --model a

fer-goemotions: $(GO_RUNS)/a_fused/best.pt
	rm -f results/fer-goemotions.csv
	for run in a_text a_fused; do \
	  $(PYTHON) evaluate.py --data $(GO_DATA) --results results/fer-goemotions.csv \
	    --checkpoint $(GO_RUNS)/$$run/best.pt || exit; done

$(GO_DATA)/meta.json: $(SETUP)
	@test -n "$(FER)" -a -n "$(GOEMOTIONS)" || { echo 'error: give both data sets: make fer-goemotions FER=path/to/fer2013 GOEMOTIONS=path/to/train.tsv' >&2; exit 2; }
	$(PYTHON) prepare_data.py --image-dir $(FER) --text-csv $(GOEMOTIONS) --image-size 48 --out $(GO_DATA)

$(GO_RUNS)/a_text/best.pt: $(GO_DATA)/meta.json
	$(GO_TRAIN) --run-name a_text --modality text --modality-dropout 0 --overwrite \
	  --epochs 15 --lr 5e-4 --warmup 200 --label-smoothing 0.1 --batch-size 32 --embed-dropout 0.3

$(GO_RUNS)/a_fused/best.pt: $(FER_RUNS)/a_image/best.pt $(GO_RUNS)/a_text/best.pt
	$(GO_TRAIN) --run-name a_fused $(FER_FUSED) --overwrite --text-from $(GO_RUNS)/a_text/best.pt --epochs 5

# Keeps data/raw: the Kaggle downloads are not generated here and are slow to fetch again.
clean:
	rm -rf data/processed data/cache $(QUICK) checkpoints results test_results.csv examples.png .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

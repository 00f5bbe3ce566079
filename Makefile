# The real path on a GPU box with Kaggle credentials:   make data train eval   (MODEL=a|b)
# A fresh machine, no GPU, no data:                     make quickstart ; make test
PYTHON ?= python
SOURCE ?= kaggle
MODEL ?= b
ARGS ?=
IMAGE ?=
TEXT ?=
QUICK := data/synthetic
QUICK_TRAIN := --data $(QUICK)/processed --no-pretrained --input-size 112 --epochs 8 --lr 5e-4 --warmup 100 --overwrite

.PHONY: install data train eval demo bench test quickstart clean

install:
	$(PYTHON) -m pip install --quiet --requirement requirements.txt

data:
	$(PYTHON) prepare_data.py --source $(SOURCE)

train:
	$(PYTHON) train.py --model $(MODEL) $(ARGS)

eval:
	$(PYTHON) evaluate.py --checkpoint checkpoints/model_$(MODEL)/best.pt --ablate

demo:
	$(PYTHON) demo.py --image "$(IMAGE)" --text "$(TEXT)"

bench:
	$(PYTHON) bench.py

test:
	$(PYTHON) -m pytest -q tests

# Synthetic data, both models trained briefly on a random trunk (no download), a
# comparison table and a demo on a generated face: a few minutes on a laptop CPU.
quickstart: install
	$(PYTHON) prepare_data.py --source synthetic --raw-dir $(QUICK)/raw --out $(QUICK)/processed
	$(PYTHON) train.py --model a --run quickstart_a $(QUICK_TRAIN)
	$(PYTHON) train.py --model b --run quickstart_b $(QUICK_TRAIN)
	rm -f results/quickstart.csv
	$(PYTHON) evaluate.py --checkpoint checkpoints/quickstart_a/best.pt --data $(QUICK)/processed --results results/quickstart.csv
	$(PYTHON) evaluate.py --checkpoint checkpoints/quickstart_b/best.pt --data $(QUICK)/processed --results results/quickstart.csv --ablate
	$(PYTHON) demo.py --checkpoint checkpoints/quickstart_b/best.pt --image "$$(ls $(QUICK)/raw/synthetic/images/test/happy/*.png | head -n 1)" --text "honestly i feel so happy and cheerful today"

# Keeps data/raw: the Kaggle downloads are not generated here and are slow to fetch again.
clean:
	rm -rf data/processed data/cache $(QUICK) checkpoints results test_results.csv examples.png .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

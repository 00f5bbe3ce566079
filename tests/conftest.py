"""Shared fixtures: one small synthetic data set and one short trained run of each model,
built once per test session (CPU, no network)."""
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts are flat modules at the repo root

import prepare_data  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from models import build_model, load_checkpoint, save_checkpoint

# 7 classes x (60 train, 20 val, 20 test) faces, 2400 sentences: big enough to learn from
SYNTHETIC = ["--source", "synthetic", "--synthetic-images", "60,20,20", "--synthetic-texts", "2400",
             "--vocab-size", "800", "--max-len", "32"]
# Small trunk input (2x2 region grid) and one encoder layer keep a CPU epoch under a second.
TINY = ["--no-pretrained", "--input-size", "64", "--layers", "1", "--batch-size", "32"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model until it reads faces, runs several scripts or processes "
                            "end to end (torchrun, gpu_check.py, bench.py, train.py then evaluate.py), or "
                            "checks a resume against a straight run or the run it continues; "
                            "make test-fast skips it")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (gpu_check.py runs them)")
    # TEST_AMP_AUTO=off: --amp auto is fp32, as on a CPU without native bf16, so that one machine
    # runs the suite both ways (it must pass on either)
    if os.environ.get("TEST_AMP_AUTO") == "off":
        runtime.cpu_has_native_bf16 = lambda: False


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    assert prepare_data.main([*SYNTHETIC, "--raw-dir", str(root / "raw"),
                              "--out", str(root / "processed")]) == 0
    return root / "processed"


# Each model trained at lr 1e-3 until it reads the texts: Model A for 8 epochs; Model B, a
# Transformer learning to read from scratch, for 10, after 10 warmup steps.
EPOCHS, WARMUP = {"a": 8, "b": 10}, {"a": 0, "b": 10}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The session's feature cache. Its files are named by the trunk's weights and the
    preprocessing, so every run with the seed-0 trunk of TINY reads what the first one wrote."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def runs(processed, cache, tmp_path_factory):
    """checkpoints/<model_a|model_b>/ after those runs; tests must not modify them."""
    out = tmp_path_factory.mktemp("checkpoints")
    for model in ("a", "b"):
        assert train.main(["--model", model, "--data", str(processed), "--out", str(out),
                           "--cache-dir", str(cache), "--lr", "1e-3", "--epochs", str(EPOCHS[model]),
                           "--warmup", str(WARMUP[model]), "--modality-dropout", "0", *TINY]) == 0
    return out


# The slow tier's faces: more test faces per class (60), so that a class's recall moves in
# steps of 1/60, and 100 training faces per class for the trunk to learn from.
FACES = ["--source", "synthetic", "--synthetic-images", "100,30,60", "--synthetic-texts", "2400",
         "--vocab-size", "800", "--max-len", "32"]
# The fused runs' seeds: each a short run on the cached trunk, seconds each
FACE_SEEDS = (0, 1, 2)


@pytest.fixture(scope="session")
def face_runs(tmp_path_factory):
    """Models whose answers rest on the face: a trunk fine-tuned on the faces (an image-only
    Model A run), then fused Model A runs on its cached features, with and without modality
    dropout, for each of FACE_SEEDS (the tier's claims are statistical: they hold on the mean,
    or on each seed with room). -> the folder holding processed/, cache/ and
    runs/{image,fused_sN,fused_md_sN}/."""
    root = tmp_path_factory.mktemp("faces")
    assert prepare_data.main([*FACES, "--raw-dir", str(root / "raw"), "--out", str(root / "processed")]) == 0
    # fp32: the tier's margins were measured on fp32 runs; the CPU's bf16 kernels give other
    # models with other thread counts, so a bf16 fixture would differ between machines
    common = ["--model", "a", "--data", str(root / "processed"), "--out", str(root / "runs"),
              "--cache-dir", str(root / "cache"), "--no-pretrained", "--input-size", "48",
              "--batch-size", "32", "--lr", "1e-3", "--warmup", "30", "--amp", "off"]
    assert train.main([*common, "--run-name", "image", "--modality", "image", "--finetune-backbone",
                       "--cosine", "--label-smoothing", "0.1", "--epochs", "15"]) == 0
    trunk = str(root / "runs" / "image" / "best.pt")
    for seed in FACE_SEEDS:
        for name, p in (("fused", "0"), ("fused_md", "0.3")):
            assert train.main([*common, "--run-name", f"{name}_s{seed}", "--trunk-from", trunk, "--seed",
                               str(seed), "--modality-dropout", p, "--epochs", "10"]) == 0
    return root


def resave(source, target, model=None, **changes):
    """A copy of a trained checkpoint with some of what train.py stores changed (args, metrics,
    temperature), or with another model in place of its own: `model`, e.g. one a test edited,
    or a fresh model of another `modality`, whose weights are random (for tests of what the
    scripts do with such a checkpoint, not of how well it predicts)."""
    loaded, _, info = load_checkpoint(source)
    model = model or loaded
    modality = changes.pop("modality", None)
    if modality:
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(model.cfg, modality=modality, pretrained=False))
    stored = dict(tokenizer_json=info["tokenizer"], classes=info["classes"], image_size=info["image_size"],
                  metrics=info["metrics"], args=info["args"], temperature=info["temperature"])
    save_checkpoint(target, model, **{**stored, **changes})
    return str(target)

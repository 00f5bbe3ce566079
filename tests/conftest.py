"""Shared fixtures: one small synthetic data set and one tiny trained run of each model,
built once per test session (CPU, no network, a few seconds each)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts are flat modules at the repo root

import prepare_data  # noqa: E402
import train  # noqa: E402

# 7 classes x (60 train, 20 val, 20 test) faces, 2400 sentences: big enough to learn from
SYNTHETIC = ["--source", "synthetic", "--synthetic-images", "60,20,20", "--synthetic-texts", "2400",
             "--vocab-size", "800", "--max-len", "32"]
# Small trunk input (2x2 region grid) and one encoder layer keep a CPU epoch under a second.
TINY = ["--no-pretrained", "--input-size", "64", "--layers", "1", "--batch-size", "32"]


@pytest.fixture(scope="session")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    assert prepare_data.main([*SYNTHETIC, "--raw-dir", str(root / "raw"),
                              "--out", str(root / "processed")]) == 0
    return root / "processed"


@pytest.fixture(scope="session")
def runs(processed, tmp_path_factory):
    """checkpoints/<model_a|model_b>/ after 2 epochs each; tests must not modify them."""
    out = tmp_path_factory.mktemp("checkpoints")
    cache = tmp_path_factory.mktemp("cache")
    for model in ("a", "b"):
        assert train.main(["--model", model, "--data", str(processed), "--out", str(out),
                           "--cache-dir", str(cache), "--epochs", "2", *TINY]) == 0
    return out

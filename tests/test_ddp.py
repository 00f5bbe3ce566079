"""torchrun: two CPU processes (gloo) train exactly as one process does, and write one run."""
import os
import subprocess
import sys

import torch

import train
from conftest import ROOT, TINY
from checkpoints import load_checkpoint
from test_train import TIMING, read_log


def test_two_processes_train_as_one(processed, tmp_path):
    # Model A with head dropout 0 has no randomness inside a step, so the ranks' slices of each
    # global batch must add up to the one-process step. Batches of 25 over 420 pairs split
    # 13 + 12 (and the last, 20, as 10 + 10): the loss scaling must make uneven slices exact.
    common = ["--model", "a", "--data", str(processed), *TINY, "--batch-size", "25", "--dropout", "0"]
    assert train.main([*common, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache1"),
                       "--epochs", "2"]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "train.py", *common, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for more in (["--epochs", "1"], ["--epochs", "2", "--resume"]):  # a resume under torchrun too
        done = subprocess.run([*torchrun, *more], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("| train loss") == 1  # rank 0 alone prints
    one, _, _ = load_checkpoint(tmp_path / "one/model_a/last.pt")
    two, _, info = load_checkpoint(tmp_path / "two/model_a/last.pt")
    assert info["train_state"]["epoch"] == 2 and len(info["train_state"]["rng"]) == 2
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    logs = [[{k: v for k, v in row.items() if k not in TIMING} for row in read_log(path)]
            for path in (tmp_path / "one/model_a/log.csv", tmp_path / "two/model_a/log.csv")]
    assert len(logs[1]) == 2 and logs[0] == logs[1]  # metrics gathered over both ranks
    files = sorted(p.name for p in (tmp_path / "two/model_a").iterdir())
    assert files == ["args.json", "best.pt", "curves.png", "last.pt", "log.csv"]
    assert len(list((tmp_path / "cache2").iterdir())) == 2  # train and val, built once

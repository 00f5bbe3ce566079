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
    # as the README's torchrun commands: a run name, then --resume
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "train.py", *common, "--out", str(tmp_path / "two"), "--run-name", "ddp",
                "--cache-dir", str(tmp_path / "cache2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for more in (["--epochs", "1"], ["--epochs", "2", "--resume"]):  # a resume under torchrun too
        done = subprocess.run([*torchrun, *more], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("| train loss") == 1  # rank 0 alone prints
    one, _, _ = load_checkpoint(tmp_path / "one/model_a/last.pt")
    two, _, info = load_checkpoint(tmp_path / "two/ddp/last.pt")
    assert info["train_state"]["epoch"] == 2 and len(info["train_state"]["rng"]) == 2
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    logs = [[{k: v for k, v in row.items() if k not in TIMING} for row in read_log(path)]
            for path in (tmp_path / "one/model_a/log.csv", tmp_path / "two/ddp/log.csv")]
    assert len(logs[1]) == 2 and logs[0] == logs[1]  # metrics gathered over both ranks
    files = sorted(p.name for p in (tmp_path / "two/ddp").iterdir())
    assert files == ["args.json", "best.pt", "curves.png", "last.pt", "log.csv"]
    assert len(list((tmp_path / "cache2").iterdir())) == 2  # train and val, built once


def test_no_train_flag_is_a_prefix_of_a_torchrun_option():
    # torchrun's parser reads the whole command line first and takes an abbreviation of its own
    # options (`--run` for `--run-path`): such a train.py flag would never reach train.py
    from torch.distributed.run import get_args_parser
    torchrun_options = [s for action in get_args_parser()._actions for s in action.option_strings
                        if s.startswith("--")]
    train_flags = [s for action in train.build_parser()._actions for s in action.option_strings
                   if s.startswith("--")]
    assert "--run-name" in train_flags and "--model" in train_flags
    clashes = [(flag, option) for flag in train_flags for option in torchrun_options
               if option.startswith(flag) and flag != "--help"]
    assert clashes == []


def test_the_cuda_path_converts_a_training_trunk_to_syncbatchnorm():
    from distributed import sync_batchnorm
    from test_models import small_model
    with torch.device("meta"):
        finetuned = small_model("b", finetune=True)
        frozen = small_model("b")
    converted = sync_batchnorm(finetuned, "cuda", world_size=2)
    kinds = {type(m) for m in converted.image_encoder.trunk.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    # the state dict keeps its names: a checkpoint loads into a plain model
    assert set(converted.state_dict()) == set(small_model("b", finetune=True).state_dict())
    for model, device_type, world_size in ((frozen, "cuda", 2), (small_model("b", finetune=True), "cpu", 2),
                                           (small_model("b", finetune=True), "cuda", 1)):
        kept = sync_batchnorm(model, device_type, world_size=world_size)
        assert torch.nn.SyncBatchNorm not in {type(m) for m in kept.modules()}

"""torchrun: two CPU processes (gloo) train exactly as one process does, and write one run."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train
from models import load_checkpoint
from conftest import ROOT, TINY
from data import Batches, load_split
from metrics import evaluate
from test_train import TIMING, read_log


# Model A with head dropout 0 has no randomness inside a step, so the ranks' slices of each
# global batch must add up to the one-process step. Batches of 25 over 420 pairs split 13 + 12
# (and the last, 20, as 10 + 10): the loss scaling must make uneven slices exact, in fp32 (bf16
# rounds a slice's sum otherwise than the whole batch's).
EXACT = [*TINY, "--batch-size", "25", "--dropout", "0", "--modality-dropout", "0", "--amp", "off"]


@pytest.fixture(scope="module")
def one_process(processed, cache, tmp_path_factory):
    """The 2-epoch run the torchrun runs are held to, trained in this process."""
    out = tmp_path_factory.mktemp("one")
    assert train.main(["--model", "a", "--data", str(processed), *EXACT, "--out", str(out), "--cache-dir",
                       str(cache), "--epochs", "2"]) == 0
    return out / "model_a"


def assert_same_run(one, other):
    """The same weights (within fp32 summation order) and the same log, timing aside."""
    first, _, _ = load_checkpoint(one / "last.pt")
    second, _, info = load_checkpoint(other / "last.pt")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    logs = [[{k: v for k, v in row.items() if k not in TIMING} for row in read_log(run / "log.csv")]
            for run in (one, other)]
    assert len(logs[1]) == 2 and logs[0] == logs[1]  # metrics gathered over both ranks
    return info


@pytest.mark.slow
def test_two_processes_train_as_one(processed, one_process, tmp_path):
    common = ["--model", "a", "--data", str(processed), *EXACT]
    # As the README's torchrun commands: a run name, then --resume. Its first epoch runs in this
    # process, so one torchrun launch both resumes a run and trains an epoch on two ranks (rank 1,
    # which the saved run did not have, keeps its own seed).
    two = ["--out", str(tmp_path / "two"), "--run-name", "ddp", "--cache-dir", str(tmp_path / "cache2")]
    assert train.main([*common, *two, "--epochs", "1"]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "train.py", *common, *two, "--epochs", "2", "--resume"]
    done = subprocess.run(torchrun, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| train loss") == 1  # rank 0 alone prints
    info = assert_same_run(one_process, tmp_path / "two/ddp")
    assert info["train_state"]["epoch"] == 2 and len(info["train_state"]["rng"]) == 2
    files = sorted(p.name for p in (tmp_path / "two/ddp").iterdir())
    assert files == ["args.json", "best.pt", "curves.png", "last.pt", "log.csv"]
    assert len(list((tmp_path / "cache2").iterdir())) == 2  # train and val, read by both ranks


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_resume_and_train_as_one(processed, one_process, tmp_path):
    # Two torchrun nodes on 127.0.0.1, one process each, each with its own copy of the data and
    # its own cache and output folders, as nodes without a shared disk have. The run's first
    # epoch trains here, into node 0's folder: the nodes resume it (node 1 has no copy of it).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [tmp_path / f"node{rank}" for rank in (0, 1)]
    for node in nodes:
        shutil.copytree(processed, node / "data")
    first = ["--model", "a", *EXACT, "--run-name", "nodes", "--data", str(nodes[0] / "data")]
    assert train.main([*first, "--out", str(nodes[0] / "out"), "--cache-dir", str(tmp_path / "cache"),
                       "--epochs", "1"]) == 0
    launches = []
    for rank, node in enumerate(nodes):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                    "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                    "train.py", "--model", "a", "--data", str(node / "data"), "--out", str(node / "out"),
                    "--cache-dir", str(node / "cache"), "--run-name", "nodes", "--epochs", "2", "--resume"]
        launches.append(subprocess.Popen(torchrun, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [launch.communicate(timeout=300) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], [err[-2000:] for _, err in results]
    assert_same_run(one_process, nodes[0] / "out" / "nodes")
    # global rank 0 alone writes the run; each node keeps its own, identical copy of the cache
    assert not (nodes[1] / "out").exists()
    names = sorted(p.name for p in (nodes[0] / "cache").iterdir())
    assert len(names) == 2 and sorted(p.name for p in (nodes[1] / "cache").iterdir()) == names
    for name in names:
        assert (nodes[0] / "cache" / name).read_bytes() == (nodes[1] / "cache" / name).read_bytes()


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
    from runtime import sync_batchnorm
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


# Runs train.py with every rank saving its own copy of the model at each checkpoint.
EVERY_RANK = """
import sys
import torch
sys.path.insert(0, {root!r})
import train
from runtime import RANK

def save(run_dir, run, improved, about, device):
    state = {{name: value.clone() for name, value in run.model.state_dict().items()}}
    torch.save(state, f"{{run_dir}}/rank{{RANK}}-epoch{{run.counters.epoch}}.pt")
    return keep(run_dir, run, improved, about, device)

keep = train.save
train.save = save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ranks_that_finetune_the_trunk_hold_one_model(processed, tmp_path):
    # BatchNorm trains with the trunk: each rank's running statistics move with its own slice,
    # so without agreement the ranks would score val with different models.
    script = tmp_path / "every_rank.py"
    script.write_text(EVERY_RANK.format(root=str(ROOT)))
    run_dir = tmp_path / "runs" / "finetune"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         "--model", "a", "--data", str(processed), *TINY, "--batch-size", "25", "--dropout", "0",
         "--finetune-backbone", "--modality-dropout", "0", "--amp", "off", "--epochs", "2",
         "--out", str(tmp_path / "runs"), "--run-name", "finetune",
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for epoch in (1, 2):
        ranks = [torch.load(run_dir / f"rank{rank}-epoch{epoch}.pt") for rank in (0, 1)]
        assert any("running_mean" in name for name in ranks[0])
        for name, value in ranks[0].items():
            assert torch.equal(value, ranks[1][name]), (epoch, name)
    # the val score that chose best.pt is the score of the model in best.pt, scored alone (fp32
    # both, as the run was told)
    model, _, info = load_checkpoint(run_dir / "best.pt")
    val = evaluate(model, Batches(load_split(processed, "val"), 256, "cpu"))
    assert val["macro_f1"] == pytest.approx(info["metrics"]["best_val_macro_f1"], abs=1e-6)


def launch_nodes(argv_of, cwds, timeout=240):
    """train.py as two torchrun nodes on 127.0.0.1, one process each, node r started in cwds[r]
    with argv_of(r) -> [(returncode, stdout, stderr)]. A node still running after `timeout`
    seconds (a rank left waiting in a collective) is killed, and the test fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                  str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                  str(port), str(ROOT / "train.py"), *argv_of(rank)],
                                 cwd=cwds[rank], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    try:
        return [(launch, *launch.communicate(timeout=timeout)) for launch in launches]
    finally:
        for launch in launches:
            launch.kill()


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_branch_checkpoints_are_read_on_rank_0_alone(processed, one_process, tmp_path):
    # --trunk-from and --text-from name a file on global rank 0's node (a relative path that
    # exists in node 0's folder alone), as nodes without a shared disk have it
    nodes = [tmp_path / f"node{rank}" for rank in (0, 1)]
    for node in nodes:
        node.mkdir()
    shutil.copy(one_process / "best.pt", nodes[0] / "donor.pt")

    def argv_of(rank):
        return ["--model", "a", *EXACT, "--data", str(processed), "--out", str(tmp_path / f"out{rank}"),
                "--cache-dir", str(tmp_path / f"cache{rank}"), "--epochs", "1", "--overwrite",
                "--trunk-from", "donor.pt", "--text-from", "donor.pt"]

    results = launch_nodes(argv_of, nodes)
    assert [launch.returncode for launch, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert (tmp_path / "out0" / "model_a" / "best.pt").exists() and not (tmp_path / "out1").exists()
    # rank 0 without the file: every rank ends with its one line, none waits for the others
    results = launch_nodes(argv_of, nodes[::-1])
    for launch, _, err in results:
        assert launch.returncode != 0 and error_lines(err) == ["error: donor.pt: no such checkpoint file"], err[-2000:]


@pytest.mark.slow
def test_an_unwritable_out_ends_every_rank_in_one_line(processed, cache, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         "--model", "a", *EXACT, "--data", str(processed), "--cache-dir", str(cache), "--epochs", "1",
         "--out", str(tmp_path / "a_file" / "runs")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert len(lines) == 2 and lines[0] == lines[1] and "Not a directory" in lines[0], done.stderr[-2000:]

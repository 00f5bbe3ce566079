"""The step never waits for the host, the ranks build the feature cache together, and each
rank's slice of a batch is a fair sample of it.

    python -m pytest tests/test_sync.py -q

A CUDA sync cannot happen on the CPU, so the CPU tests watch for what would cause one: a copy
between the host and a device, or a tensor's value read on the host (.item(), .tolist(),
int(), bool(), ...) inside forward and backward. The "meta" device stands in for a GPU: its
tensors live off the host, so a copy from the host to it shows as one. Where CUDA exists,
test_cuda_steps_never_sync runs real steps under torch.cuda.set_sync_debug_mode("error").
"""
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import train  # noqa: E402
from data import Batches, cached_features  # noqa: E402
from runtime import DataError, autocast  # noqa: E402
from test_models import VOCAB, small_model  # noqa: E402

# Python-level ways to read a tensor's value on the host (a sync on CUDA)
HOST_READS = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__")


def synthetic_split(n=48, length=12, seed=0):
    """Right-padded texts of 0..length tokens (empty ones too) and random faces."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (n,), generator=generator).to(torch.int16)
    input_ids = torch.randint(1, VOCAB, (n, length), generator=generator, dtype=torch.int32)
    input_ids[torch.arange(length) >= lengths.long().unsqueeze(1)] = 0
    images = torch.randint(0, 256, (n, 75, 75), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 7, (n,), generator=generator)
    return {"images": images, "labels": labels, "input_ids": input_ids, "lengths": lengths}


def _moves(tensor, args, kwargs):
    """Whether tensor.to(*args, **kwargs) names a device other than the tensor's."""
    device = torch._C._nn._parse_to(*args, **kwargs)[0]
    if device is None:
        return False
    return device.type != tensor.device.type or device.index not in (None, tensor.device.index)


class DispatcherWatch(TorchDispatchMode):
    """Below Python: every aten op of forward and backward, with the value reads
    (_local_scalar_dense) and the copies from one device to another among them."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.add(str(func))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls.append(f"{func} on {args[0].device}")
        target = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and target is not None:
            if torch.device(target).type != args[0].device.type:
                self.calls.append(f"{func} {args[0].device} -> {target}")
        if func is torch.ops.aten.copy_.default and args[0].device.type != args[1].device.type:
            self.calls.append(f"{func} {args[1].device} -> {args[0].device}")
        return func(*args, **kwargs)


@contextmanager
def host_traffic():
    """-> (calls, watch): every host read and host<->device copy made inside the block, from
    Python (the Tensor methods above, .to/.cuda to another device) and at the dispatcher."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "to", "cuda")}

    def counted(name, method):
        def wrapper(tensor, *args, **kwargs):
            if name in HOST_READS or name == "cuda" or _moves(tensor, args, kwargs):
                calls.append(f"Tensor.{name} on {tensor.device}")
            return method(tensor, *args, **kwargs)
        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        watch = DispatcherWatch(calls)
        with watch:
            yield calls, watch
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


# ---- 1. no host sync in the step --------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("arch", ["a", "b"])
def test_a_training_step_copies_nothing_and_reads_nothing_on_the_host(arch, device):
    # Fails on the code before lengths moved to the device: Model A's packing called
    # lengths.cpu() and int() on its batch sizes, and moved its sorted indices and the
    # empty-text mask to the device; Model B moved lengths from the host (a copy on "meta").
    model = small_model(arch)
    split = synthetic_split()
    with torch.no_grad():
        features = {k: v.unsqueeze(0) for k, v in model.image_features(split["images"]).items()}
    model = model.to(device).train()
    batches = list(Batches(split, 16, device, features=features, shuffle=True))
    for batch in batches:
        with host_traffic() as (calls, watch):
            logits = model(batch["input_ids"], batch["lengths"], image_features=batch["image_features"])
            F.cross_entropy(logits, batch["labels"]).backward()
        assert calls == [], calls
        # the watch saw the backward pass, text branch included
        assert "aten.embedding_dense_backward.default" in watch.seen
    assert all(b["lengths"].device.type == device for b in batches)
    # The watch is not blind: lengths given on the host (as the demo does) are one copy off it.
    if device == "meta":
        host_lengths = torch.full((len(batch["labels"]),), 3)
        with host_traffic() as (calls, _):
            model(batch["input_ids"], host_lengths, image_features=batch["image_features"])
        assert calls, "the watch missed the copy of lengths from the host"


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["a", "b"])
def test_cuda_steps_never_sync(arch, tmp_path):
    """A few cached training steps as train.py takes them (autocast, fused AdamW, clipping),
    batches served on the device: any synchronizing CUDA call raises."""
    device = torch.device("cuda")
    model = small_model(arch).to(device)
    split = synthetic_split(n=96, length=24)
    features, _ = cached_features(model, split["images"], tmp_path, device, flips=True, show_progress=False)
    batches = Batches(split, 32, device, features=features, shuffle=True, flip=True)
    groups = train.parameter_groups(model, 1e-3, 0.01, backbone_lr_scale=1.0)
    optimizer = torch.optim.AdamW(groups, fused=True)
    mixed_precision, dtype = autocast(device, "auto")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            for batch in batches:
                with mixed_precision:
                    logits = model(batch["input_ids"], batch["lengths"], image_features=batch["image_features"])
                    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                scaler.scale(loss / batch["global_size"]).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


# ---- 3. each rank's rows: dealt, not cut ------------------------------------------
def test_ranks_are_dealt_rows_that_span_each_batch():
    # Distinct lengths 1..96: the one window of 3 batches is sorted, so each batch holds 32
    # consecutive lengths. Rank r of 3 takes rows r, r + 3, ...: 11, 11 and 10 rows.
    n = 96
    split = synthetic_split(n=n, length=n)
    split["lengths"] = (torch.randperm(n, generator=torch.Generator().manual_seed(1)) + 1).to(torch.int16)
    split["labels"] = torch.arange(n)  # which sample a row is
    whole = list(Batches(split, 32, "cpu", shuffle=True, seed=5))
    world = 3
    ranks = [list(Batches(split, 32, "cpu", shuffle=True, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert len(whole) == 3 and all(len(batches) == 3 for batches in ranks)
    for batch, *slices in zip(whole, *ranks):
        lengths = batch["lengths"]
        assert torch.equal(lengths, lengths.sort().values)  # one process: the batch in order
        for rank, part in enumerate(slices):
            assert part["global_size"] == len(batch["labels"]) == 32
            # exactly the rows dealt to it, so the ranks' slices are the batch, each row once
            assert torch.equal(part["labels"], batch["labels"][rank::world])
            assert torch.equal(part["lengths"], lengths[rank::world])
            # each slice spans the batch's range of lengths: its shortest text among the batch's
            # `world` shortest, its longest among the `world` longest
            assert part["lengths"].min() <= lengths[world - 1] and part["lengths"].max() >= lengths[-world]
            width = int(part["lengths"].max())
            assert torch.equal(part["input_ids"], split["input_ids"][part["labels"], :width].long())
        union = torch.cat([part["labels"] for part in slices]).sort().values
        assert torch.equal(union, batch["labels"].sort().values)


# ---- 2. the cache, built by every rank ---------------------------------------------
def cache_worker(cache_dir, fail_on_rank):
    """One process of the cache test: build the train-like (flips) and val-like caches the way
    train.py does, under a gloo process group when WORLD_SIZE > 1; `fail_on_rank` raises in
    that rank's second batch. Prints 'batches N' (batches computed), or one `error:` line."""
    import torch.distributed as dist
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1:
        dist.init_process_group("gloo")
    model = small_model("b")
    split = synthetic_split(n=20)
    computed = []
    image_features = model.image_features

    def counting(images):
        computed.append(len(images))
        if rank == fail_on_rank and len(computed) == 2:
            raise RuntimeError("injected failure\nwith a second line")
        return image_features(images)

    model.image_features = counting
    try:
        # 20 images in batches of 8: 3 batches a view, 6 with flips (3 + 3 per rank), 3
        # without (2 + 1): uneven shares and a partial last batch. fp32 in every process: the
        # workers do not share this process's view of --amp auto (TEST_AMP_AUTO)
        for flips in (True, False):
            cached_features(model, split["images"], cache_dir, "cpu", flips=flips, amp="off", batch_size=8,
                            show_progress=False)
        print(f"batches {len(computed)}", flush=True)
        return 0
    except DataError as err:
        print(f"batches {len(computed)}", flush=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(cache_dir, world_size, fail_on_rank=-1):
    """Start `world_size` cache workers (gloo, 1 thread each) -> [(returncode, stdout, stderr)]."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(world_size)}
    workers = [subprocess.Popen([sys.executable, __file__, str(cache_dir), str(fail_on_rank)],
                                env={**env, "RANK": str(rank)}, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for rank in range(world_size)]
    results = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            raise
        results.append((worker.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_ranks_build_the_cache_one_process_would(tmp_path, capsys):
    alone = tmp_path / "alone"
    ranks = tmp_path / "ranks"
    assert cache_worker(alone, -1) == 0  # one process: this one
    assert capsys.readouterr().out.split() == ["batches", "9"]
    results = run_workers(ranks, 2)
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    # each rank computed its share, rank 0 the larger: 3 + 2 batches on rank 0, 3 + 1 on rank 1
    assert [out.split() for _, out, _ in results] == [["batches", "5"], ["batches", "4"]]
    files = sorted(p.name for p in alone.iterdir())
    assert len(files) == 2 and sorted(p.name for p in ranks.iterdir()) == files  # nothing left over
    for name in files:
        assert (ranks / name).read_bytes() == (alone / name).read_bytes(), name


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_both_in_one_line(tmp_path):
    start = time.monotonic()
    results = run_workers(tmp_path / "cache", 2, fail_on_rank=1)
    seconds = time.monotonic() - start
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: building the feature cache failed on rank 1: "
                                                       "RuntimeError: injected failure with a second line"), err
    # rank 0 stopped after the batch in which rank 1 failed (its second), not after its share (3)
    assert [out.split() for _, out, _ in results] == [["batches", "2"], ["batches", "2"]]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert seconds < 120  # process starts included; the gloo timeout is 30 minutes


if __name__ == "__main__":
    sys.exit(cache_worker(sys.argv[1], int(sys.argv[2])))

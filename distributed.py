"""torchrun, the nanoGPT way: this process's rank, and putting every rank's results together.

    from distributed import RANK, WORLD_SIZE, MASTER, gather, broadcast, from_master
    values = gather(value)        # [rank 0's value, rank 1's, ...] on every rank
    value = broadcast(value)      # rank 0's value on every rank
    data = from_master(path.read_bytes)  # read on rank 0, its bytes (or its error) on every rank

torchrun sets RANK and WORLD_SIZE; one process alone is rank 0 of 1, and every function
here is then a no-op. train.py starts the process group and wraps the model in
DistributedDataParallel; there is no launcher of our own.
"""
import os

import numpy as np
import torch.distributed as dist
from torch import nn

RANK = int(os.environ.get("RANK", 0))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))
# Rank 0, the master, alone prints and writes the run's files.
MASTER = RANK == 0


def gather(value):
    """[value of rank 0, value of rank 1, ...]: every rank calls it and gets the list."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value, src=0):
    """Rank `src`'s value, on every rank: every rank calls it, and only `src`'s value matters."""
    if not dist.is_initialized():
        return value
    values = [value]
    dist.broadcast_object_list(values, src=src)
    return values[0]


def from_master(work):
    """`work()` on global rank 0 alone, and its value (or the error it raised) on every rank: the
    run's own files are on rank 0's node, and nodes need no shared disk. Reading them there, or
    writing them, a failure ends every rank, not rank 0 alone while the others wait."""
    value = None
    error = None
    if MASTER:
        try:
            value = work()
        except Exception as err:
            error = err
    value, error = broadcast((value, error))
    if error is not None:
        raise error
    return value


def all_ranks(labels, preds, loss_sum):
    """(labels, preds, summed loss) of one rank's samples -> those of every rank's samples."""
    parts = gather((labels, preds, loss_sum))
    labels = np.concatenate([part[0] for part in parts])
    preds = np.concatenate([part[1] for part in parts])
    return labels, preds, sum(part[2] for part in parts)


def sync_batchnorm(model, device_type, world_size=WORLD_SIZE):
    """A trunk that trains under DDP on GPUs gets SyncBatchNorm: each step normalizes with the
    statistics of the whole global batch and every rank's running statistics move alike, as one
    process's would. torch's SyncBatchNorm raises on CPU tensors while training under a process
    group (nn/modules/batchnorm.py: "SyncBatchNorm expected input tensor to be on GPU"), so on
    the CPU the ranks agree through average_batchnorm_buffers instead. A frozen trunk's
    BatchNorm never trains: nothing to do."""
    if device_type == "cuda" and world_size > 1 and model.cfg.finetune:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def average_batchnorm_buffers(model):
    """CPU (gloo) runs whose trunk trains: set every rank's BatchNorm running statistics to their
    mean over the ranks, so that all ranks evaluate and save one model. DDP only copies rank 0's
    buffers at the start of a forward, and each rank then updates them from its own slice."""
    if not dist.is_initialized() or not model.cfg.finetune:
        return
    world_size = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer /= world_size

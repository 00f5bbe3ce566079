"""torchrun, the nanoGPT way: this process's rank, and putting every rank's results together.

    from distributed import RANK, WORLD_SIZE, MASTER, gather
    values = gather(value)        # [rank 0's value, rank 1's, ...] on every rank

torchrun sets RANK and WORLD_SIZE; one process alone is rank 0 of 1, and every function
here is then a no-op. train.py starts the process group and wraps the model in
DistributedDataParallel; there is no launcher of our own.
"""
import os

import numpy as np
import torch.distributed as dist

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


def all_ranks(labels, preds, loss_sum):
    """(labels, preds, summed loss) of one rank's samples -> those of every rank's samples."""
    parts = gather((labels, preds, loss_sum))
    labels = np.concatenate([part[0] for part in parts])
    preds = np.concatenate([part[1] for part in parts])
    return labels, preds, sum(part[2] for part in parts)

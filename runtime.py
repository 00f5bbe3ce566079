"""Run-time helpers that every script shares: the error a user can act on, atomic files,
the device and precision choice, progress lines, and torchrun.

    from runtime import DataError, atomic_write, pick_device, autocast, progress
    device = pick_device("auto")                   # CUDA when present, else the CPU
    mixed_precision, dtype = autocast(device, "auto")
    with atomic_write("out/log.csv") as tmp:       # readers never see a half-written file
        tmp.write_text(text)
    data = from_master(path.read_bytes)            # read on rank 0, its bytes (or its error) on every rank
"""
import argparse
import csv
import io
import os
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


class DataError(ValueError):
    """A problem the user can fix (missing data, a bad flag, an unwritable path); the message
    says what to do. Scripts print it as one `error:` line and exit 2."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as a short single line, for messages that must stay one line."""
    text = " ".join(str(err).split()) or "?"
    ellipsis = "..." if len(text) > limit else ""
    return f"{type(err).__name__}: {text[:limit]}{ellipsis}"


@contextmanager
def atomic_write(path):
    """Yield a temporary name beside `path`; it replaces `path` only when the block ends
    without an error, so no reader (or later run) ever sees a half-written file."""
    path = Path(path)
    # A folder unique to the process, so two runs writing one file (a shared data/cache) never write into
    # each other's temporary file. The file keeps its own name, because torch.save records it in its bytes.
    folder = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    folder.mkdir(parents=True)
    try:
        yield folder / path.name
        # The data reaches the disk before the rename: otherwise, after a power cut, some file
        # systems (XFS among them) show a zero-length file.
        with open(folder / path.name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(folder / path.name, path)
        # the folder holds the rename; Windows cannot open a folder to sync it
        if os.name == "posix":
            handle = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_dir(path):
    """The same for a folder: fill the fresh folder it yields; it replaces `path` whole
    when the block ends without an error, and is removed when it does not."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial")
    # left by a run killed half way: start over
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default, and the script's docstring as written (its examples).
    A switch (default False), a required flag and a default of None say nothing more."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """A bad flag or value is one line and exit 2, as every other bad input is; --help has the rest."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def script_parser(doc):
    """The argument parser of a script: its docstring (usage examples first) as the description.
    No abbreviated flags: under torchrun an abbreviation meets torchrun's own options first."""
    return ScriptParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)


def positive_int(value):
    """argparse type: a whole number of at least 1 (a batch size, a count of epochs)."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def unit_fraction(value):
    """argparse type: a number in [0, 1) (a dropout probability)."""
    number = float(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return number


def pick_device(name="auto"):
    """'auto' -> CUDA when present, else CPU; an explicit 'cuda' without a GPU is an error.
    Under torchrun, CUDA is this process's own GPU (LOCAL_RANK), made the current one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs whose oneDNN kernels compute bf16 natively."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(device, amp="auto"):
    """Mixed precision context -> (context, dtype or None). 'auto' is bf16 where the device computes
    it natively: a GPU of compute capability 8.0 or later (A100, RTX 30xx), or a CPU with AVX512-BF16
    or AMX, where a step runs 1.5 to 2.6 times as fast as in fp32 at the same accuracy (docs/speed.md).
    It is fp16 on older GPUs such as the T4 and V100, whose bf16 is emulated and whose cuDNN has no bf16
    convolutions (train.py adds a GradScaler), and off on other CPUs, where emulated bf16 is slower."""
    device = torch.device(device)
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            amp = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), dtype


def fits_on_device(tensors, device, margin=0.25):
    """Whether `tensors` (a dict) can move to `device` and still leave `margin` of the card free
    for the model, the optimizer and the activations. The CPU holds them already."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    return sum(t.nbytes for t in tensors.values()) <= free - margin * total


def progress(items, desc, *, unit="batches", enabled=True, every=30.0):
    """Iterate over `items` with a tqdm bar on a terminal. Elsewhere (`nohup make train > log`) a bar
    would write a stream of carriage returns, so a plain line with done/total, rate and ETA (done and
    rate alone when `items` has no length, a camera's frames) appears at most every `every` seconds."""
    if not enabled:
        yield from items
        return
    if sys.stdout.isatty():
        from tqdm import tqdm
        yield from tqdm(items, desc=desc, unit=unit, leave=False)
        return
    total = len(items) if hasattr(items, "__len__") else None
    start = time.monotonic()
    last = start
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every and done != total:
            rate = done / (now - start)
            if total is None:
                print(f"{desc}: {done} {unit} | {rate:.1f} {unit}/s", flush=True)
            else:
                eta = (total - done) / rate
                print(f"{desc}: {done}/{total} {unit} | {rate:.1f} {unit}/s | ETA {eta // 60:.0f} min "
                      f"{eta % 60:02.0f} s", flush=True)
            last = now


def read_log(path):
    """A run's log.csv as a list of rows (dicts of strings). A last row without its newline was
    cut short by a crash and is dropped, not read."""
    text = Path(path).read_text()
    return list(csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1])))


# torchrun sets RANK and WORLD_SIZE (the nanoGPT way: no launcher of our own). A process started
# alone is rank 0 of 1, where the functions below do nothing. train.py starts the process group.
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
    """`work()` on rank 0 alone, and its value (or the error it raised) on every rank: the run's files are on
    rank 0's node, and a failure there must end every rank, not rank 0 alone while the others wait."""
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
    """SyncBatchNorm for a trunk that trains under DDP on GPUs: each step normalizes with the statistics
    of the whole global batch, and every rank's running statistics move alike. On CPU tensors torch's
    SyncBatchNorm raises ("SyncBatchNorm expected input tensor to be on GPU"), so there the ranks agree
    through average_batchnorm_buffers instead. A frozen trunk's BatchNorm never trains."""
    if device_type == "cuda" and world_size > 1 and model.cfg.finetune:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def average_batchnorm_buffers(model):
    """For CPU (gloo) runs whose trunk trains: sets every rank's BatchNorm running statistics to their mean
    over the ranks, so that all ranks evaluate and save one model. DDP only copies rank 0's buffers at the
    start of a forward, and each rank then updates them from its own slice."""
    if not dist.is_initialized() or not model.cfg.finetune:
        return
    world_size = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer /= world_size

"""Run-time helpers every script shares: the error a user can act on, atomic files, the
device and precision choice, and progress lines.

    from runtime import DataError, atomic_write, pick_device, autocast, progress
    device = pick_device("auto")                   # CUDA when present, else the CPU
    mixed_precision, dtype = autocast(device, "auto")
    with atomic_write("out/log.csv") as tmp:       # readers never see a half-written file
        tmp.write_text(text)

It holds no model, no data and no metric: those live in models.py, data.py and metrics.py.
"""
import argparse
import os
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


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
    without an error, so no reader (or later run) ever sees a half-written file, even after a
    power cut: the file reaches the disk before the rename, and the rename after it."""
    path = Path(path)
    # A folder unique to the process: two runs writing one file (a shared data/cache) never
    # write into each other's temporary file; the last os.replace wins, whole. The file
    # keeps its own name inside it, because torch.save records the name in its bytes.
    folder = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    folder.mkdir(parents=True)
    try:
        yield folder / path.name
        # Without this a rename can reach the disk before the data: after a power cut some
        # file systems (XFS among them) show a zero-length file.
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
    """argparse type: a number in [0, 1) (a dropout probability, an EMA decay)."""
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
    """Mixed precision context -> (context, dtype or None). 'auto' is bf16 where the device
    computes it natively: a GPU of compute capability 8.0 on (A100, RTX 30xx and later), or a
    CPU with AVX512-BF16 or AMX (there a fine-tuning step runs 1.5x and a Model B step on cached
    features 2.6x an fp32 one, at the same accuracy: docs/speed.md). fp16 on older GPUs (T4,
    V100: their bf16 is emulated and cuDNN has no bf16 convolutions; train.py adds a
    GradScaler), and off on other CPUs (emulated bf16 is slower than fp32)."""
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
    """Iterate over `items` (a sized iterable) showing progress: a tqdm bar on a terminal;
    otherwise (`nohup make train > log`) a plain line at most every `every` seconds with
    done/total, rate and ETA, where a bar would write a stream of carriage returns."""
    if not enabled:
        yield from items
        return
    if sys.stdout.isatty():
        from tqdm import tqdm
        yield from tqdm(items, desc=desc, unit=unit, leave=False)
        return
    total = len(items)
    start = time.monotonic()
    last = start
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every and done < total:
            rate = done / (now - start)
            eta = (total - done) / rate
            print(f"{desc}: {done}/{total} {unit} | {rate:.1f} {unit}/s | ETA {eta // 60:.0f} min "
                  f"{eta % 60:02.0f} s", flush=True)
            last = now

"""Reading the prepared data set, serving batches, and the frozen-trunk feature cache.

    from data import load_split, Batches
    train = load_split("data/processed", "train")
    for batch in Batches(train, batch_size=64, device="cpu", shuffle=True):
        logits = model(batch["input_ids"], batch["lengths"], images=batch["images"])

prepare_data.py writes data/processed; this module only reads it (and writes the
feature cache under data/cache). The whole data set is a few hundred MB of uint8,
so it lives in memory and is served without a DataLoader: a seeded permutation,
slicing, padding trimmed per batch, device copies (as cifar10-airbench does).
"""
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
FORMAT_VERSION = 1  # bump when the shard layout changes; readers refuse other versions
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Missing or malformed prepared data; the message says what to run."""


@contextmanager
def atomic_write(path):
    """Yield a temporary name beside `path`; it replaces `path` only when the block ends
    without an error, so no reader (or later run) ever sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path):
    """The same for a folder: fill the fresh folder it yields; it replaces `path` whole
    when the block ends without an error, and is removed when it does not."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed half way: start over
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pick_device(name="auto"):
    """'auto' -> CUDA when present, else CPU; an explicit 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast(device, amp="auto"):
    """Mixed precision context: 'auto' is bf16 on CUDA when supported, else fp16, and off on
    CPU (CPU bf16 is slower than fp32 on most CPUs). Returns (context, dtype or None)."""
    device = torch.device(device)
    if amp == "auto":
        amp = "off" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), dtype


def encode_texts(tokenizer, texts, max_len):
    """Tokenize sentences -> input_ids int32 [N, max_len] (0 = pad, right-padded), lengths int16 [N]."""
    encodings = tokenizer.encode_batch(list(texts))
    input_ids = np.zeros((len(encodings), max_len), dtype=np.int32)
    lengths = np.zeros(len(encodings), dtype=np.int16)
    for row, encoding in enumerate(encodings):
        ids = encoding.ids[:max_len]  # truncate: max_len keeps nearly every tweet whole
        input_ids[row, : len(ids)] = ids
        lengths[row] = len(ids)
    return torch.from_numpy(input_ids), torch.from_numpy(lengths)


def _load(path):
    if not path.exists():
        raise DataError(f"{path} not found: run `python prepare_data.py` first (or pass --data)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {blob.get('version')}, this code reads "
                        f"{FORMAT_VERSION}: rerun `python prepare_data.py --force`")
    return blob


def load_meta(processed_dir):
    path = Path(processed_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{path} not found: run `python prepare_data.py` first (or pass --data)")
    return json.loads(path.read_text())


def load_tokenizer(processed_dir):
    from tokenizers import Tokenizer
    path = Path(processed_dir) / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{path} not found: run `python prepare_data.py` first (or pass --data)")
    return Tokenizer.from_file(str(path))


def load_split(processed_dir, split):
    """All shards of one split concatenated: images uint8 [N,S,S], labels int64 [N],
    input_ids int32 [N,L], lengths int16 [N]. meta.json names the shards: it is written
    last, so a half-written data set is never read."""
    meta = load_meta(processed_dir)
    if meta.get("version") != FORMAT_VERSION or split not in meta.get("shards", {}):
        raise DataError(f"{processed_dir}/meta.json is from another version of this project: "
                        "rerun `python prepare_data.py --force`")
    names = meta["shards"][split]
    shards = [_load(Path(processed_dir) / name) for name in names]
    keys = ("images", "labels", "input_ids", "lengths")
    return {key: torch.cat([shard[key] for shard in shards]) for key in keys}


def load_text_pool(processed_dir):
    """The whole tokenized train text pool: input_ids [T,L], lengths [T], labels [T] (image class)."""
    blob = _load(Path(processed_dir) / "texts-train.pt")
    return {key: blob[key] for key in ("input_ids", "lengths", "labels")}


class Batches:
    """One split served in batches, all randomness from one seeded generator.

    Each pass (epoch) draws, in this order, a fresh text for every image from
    `text_pool` (the reference re-draws texts every epoch), a flip coin per image, and
    (shuffle) a permutation grouped into batches of similar text length. `features` replaces images with cached trunk features,
    dicts of [V,N,...] tensors where V=2 holds the flipped image's features too.
    `generator.get_state()` after a pass is all a resume needs.
    """

    def __init__(self, split, batch_size, device, *, features=None, shuffle=False,
                 flip=False, text_pool=None, seed=0):
        self.split, self.batch_size, self.device = split, batch_size, torch.device(device)
        self.features, self.shuffle, self.flip, self.text_pool = features, shuffle, flip, text_pool
        self.generator = torch.Generator().manual_seed(seed)
        if features is not None and flip and next(iter(features.values())).shape[0] < 2:
            raise ValueError("flip needs features of flipped images (a cache built with flips=True)")
        self.pin = self.device.type == "cuda"

    def __len__(self):
        return -(-len(self.split["labels"]) // self.batch_size)

    def _redraw_texts(self):
        """A random pool text of each image's class; classes without texts (Disgust and
        Neutral under --unpaired random) get any text, so the text carries no signal."""
        labels, pool = self.split["labels"], self.text_pool
        choice = torch.empty(len(labels), dtype=torch.long)
        for cls in labels.unique().tolist():
            rows = (labels == cls).nonzero().squeeze(1)
            candidates = (pool["labels"] == cls).nonzero().squeeze(1)
            if len(candidates) == 0:
                candidates = torch.arange(len(pool["labels"]))
            picks = torch.randint(len(candidates), (len(rows),), generator=self.generator)
            choice[rows] = candidates[picks]
        return pool["input_ids"][choice], pool["lengths"][choice]

    def _to_device(self, tensor):
        if self.pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _bucketed(self, order, lengths):
        """Shuffled batches of similar text length: sort each window of 32 batches by
        length, cut it into batches, shuffle the batches. Padding is trimmed per batch, so
        this removes most of the Transformer's work on pad tokens (tweets run from 3 to 64
        tokens) while every epoch still sees a new random grouping."""
        window = 32 * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            batches += list(chunk.split(self.batch_size))
        shuffled = torch.randperm(len(batches), generator=self.generator)
        return [batches[i] for i in shuffled]

    def __iter__(self):
        n = len(self.split["labels"])
        input_ids, lengths = self.split["input_ids"], self.split["lengths"]
        if self.text_pool is not None:
            input_ids, lengths = self._redraw_texts()
        flipped = (torch.rand(n, generator=self.generator) < 0.5 if self.flip
                   else torch.zeros(n, dtype=torch.bool))
        if self.shuffle:
            batches = self._bucketed(torch.randperm(n, generator=self.generator), lengths)
        else:
            batches = torch.arange(n).split(self.batch_size)
        for idx in batches:
            batch_lengths = lengths[idx].long()
            width = max(int(batch_lengths.max()), 1)  # trim padding to the longest row
            batch = {"input_ids": self._to_device(input_ids[idx, :width].long()),
                     "lengths": batch_lengths,  # stays on CPU: packing reads it there
                     "labels": self._to_device(self.split["labels"][idx])}
            if self.features is not None:
                variant = flipped[idx].long()  # 0: as stored, 1: mirrored
                batch["image_features"] = {k: self._to_device(v[variant, idx])
                                           for k, v in self.features.items()}
            else:
                images = self.split["images"][idx]
                images = torch.where(flipped[idx, None, None], images.flip(-1), images)
                batch["images"] = self._to_device(images)
            yield batch


def _hash_tensor(digest, tensor):
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def cached_features(model, images, cache_dir, device, *, flips, batch_size=256, progress=True):
    """Trunk features of every image (and of its mirror when `flips`), computed once.

    A frozen trunk makes the features a pure function of (image bytes, trunk weights,
    preprocessing), so their hash is the cache key and a stale cache cannot be read.
    Stored as float16 [V,N,...] (V = 2 with flips): half the memory of fp32, and its
    relative error (~5e-4) is far below what training notices.
    """
    from models import feature_fingerprint
    digest = hashlib.sha256()
    _hash_tensor(digest, images)
    digest.update(f"{feature_fingerprint(model)}|flips={flips}".encode())
    path = Path(cache_dir) / f"features-{digest.hexdigest()[:24]}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True), path
    from tqdm import tqdm
    device = torch.device(device)
    variants = [images, images.flip(-1)] if flips else [images]
    chunks = {}
    mixed_precision, _ = autocast(device)
    if device.type == "cuda":  # NHWC convolutions run faster on tensor cores; same numbers
        model.to(memory_format=torch.channels_last)
    model.eval()
    steps = [(v, i) for v in range(len(variants)) for i in range(0, len(images), batch_size)]
    with torch.inference_mode(), mixed_precision, tqdm(steps, desc="caching features", unit="batch",
                                                disable=None if progress else True, leave=False) as bar:
        for v, i in bar:
            batch = variants[v][i:i + batch_size].to(device, non_blocking=True)
            for key, value in model.image_features(batch).items():
                chunks.setdefault(key, [[] for _ in variants])[v].append(value.half().cpu())
    features = {key: torch.stack([torch.cat(parts) for parts in per_variant])
                for key, per_variant in chunks.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:  # a killed run never leaves a half-written cache
        torch.save(features, tmp)
    return features, path

"""The prepared data set in memory: shards, the text pool, batches, the feature cache.

    from data import load_split, Batches
    train = load_split("data/processed", "train")
    for batch in Batches(train, batch_size=64, device="cpu", shuffle=True):
        logits = model(batch["input_ids"], batch["lengths"], images=batch["images"])

prepare_data.py writes data/processed; this module only reads it (and writes the
feature cache under data/cache). The whole data set is a few hundred MB of uint8,
so it lives in memory and is served without a DataLoader: a seeded permutation,
slicing, padding trimmed per batch, device copies (as cifar10-airbench does).
It holds no model (models.py) and no device or file helper (runtime.py).
"""
import hashlib
import json
import sys
from pathlib import Path

import torch

from runtime import DataError, atomic_write, autocast, fits_on_device, one_line, progress

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
FORMAT_VERSION = 1  # bump when the shard layout changes; readers refuse other versions
SPLITS = ("train", "val", "test")
# A missing face: mid-gray, no face and no contrast. The ablation, --modality-dropout and the
# demo without --image all use this one blank image, so a missing face is one input the model knows.
BLANK_PIXEL = 128


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

    Each pass (epoch) draws, in this order, a fresh text for every image from `text_pool`
    (the reference re-draws texts every epoch), a flip coin per image, and (shuffle) a
    permutation grouped into batches of similar text length. `features` replaces images
    with cached trunk features, dicts of [V,N,...] tensors where V=2 holds the flipped
    image's features too. `generator.get_state()` after a pass is all a resume needs.

    Under torchrun (rank, world_size) every rank draws the same shuffled batches and takes its
    slice of each one (`batch_size` is the global batch); `global_size` in each batch says how
    many samples the whole batch holds, so the loss can be the mean over all of them. Without
    shuffle (evaluation) each rank serves a contiguous share of the split instead.

    The image side (features or images) moves to the device once when it fits there
    (`on_device=None`: when it leaves a margin of free memory) and each batch is gathered on
    the device; otherwise each batch is gathered into one pinned buffer, reused every step,
    and copied without blocking. Either way the step loop never waits for the host.
    """

    def __init__(self, split, batch_size, device, *, features=None, shuffle=False,
                 flip=False, text_pool=None, seed=0, rank=0, world_size=1, on_device=None):
        self.split, self.batch_size, self.device = split, batch_size, torch.device(device)
        self.shuffle, self.flip, self.text_pool = shuffle, flip, text_pool
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.cached = features is not None
        if self.cached and flip and next(iter(features.values())).shape[0] < 2:
            raise ValueError("flip needs features of flipped images (a cache built with flips=True)")
        # Rows of [V*N, ...]: row v*N + i is image i as stored (v=0) or mirrored (v=1).
        sources = ({k: v.flatten(0, 1) for k, v in features.items()} if self.cached
                   else {"images": split["images"]})
        self.on_device = fits_on_device(sources, self.device) if on_device is None else on_device
        if self.on_device:
            self.sources = {k: v.to(self.device) for k, v in sources.items()}
        else:
            self.sources = sources
            self.buffers = {k: torch.empty((batch_size, *v.shape[1:]), dtype=v.dtype,
                                           pin_memory=self.device.type == "cuda")
                            for k, v in sources.items()}
            self.copied = None  # CUDA event: the last copy out of the buffers has finished

    def __len__(self):
        if not self.shuffle:
            return len(self._share().split(self.batch_size))
        n, batches = len(self.split["labels"]), -(-len(self.split["labels"]) // self.batch_size)
        return batches - (0 < n % self.batch_size < self.world_size)

    def _share(self):
        """This rank's contiguous share of the sample indices (all of them on one process)."""
        return torch.arange(len(self.split["labels"])).tensor_split(self.world_size)[self.rank]

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

    def _gather(self, rows):
        """The image side of one batch: `rows` of every source, on the device."""
        if self.on_device:
            return {k: v.index_select(0, rows) for k, v in self.sources.items()}
        if self.copied is not None:
            self.copied.synchronize()  # the previous batch has left the buffer (not: its step has run)
        batch = {}
        for k, v in self.sources.items():
            buffer = self.buffers[k][:len(rows)]
            torch.index_select(v, 0, rows, out=buffer)
            batch[k] = buffer.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()
        return batch

    def __iter__(self):
        n = len(self.split["labels"])
        input_ids, lengths = self.split["input_ids"], self.split["lengths"]
        if self.text_pool is not None:
            input_ids, lengths = self._redraw_texts()
        flipped = (torch.rand(n, generator=self.generator) < 0.5 if self.flip
                   else torch.zeros(n, dtype=torch.bool))
        if self.shuffle:
            # This rank's slice of each global batch; a last batch too small to give every rank
            # a sample is dropped (under torchrun only: fewer than world_size samples an epoch).
            batches = self._bucketed(torch.randperm(n, generator=self.generator), lengths)
            mine = [(idx.tensor_split(self.world_size)[self.rank], len(idx))
                    for idx in batches if len(idx) >= self.world_size]
        else:
            mine = [(idx, len(idx)) for idx in self._share().split(self.batch_size)]
        order = torch.cat([idx for idx, _ in mine])  # (n,) sample indices, batch after batch
        rows = flipped[order].long() * n + order if self.cached else order
        # The epoch's text, labels and indices move to the device once; each step slices them.
        epoch = {"input_ids": input_ids, "labels": self.split["labels"], "order": order,
                 "flipped": flipped[order], "rows": rows}
        epoch = {k: v.to(self.device, non_blocking=True) for k, v in epoch.items()}
        start = 0
        for idx, global_size in mine:
            at = slice(start, start + len(idx))
            start += len(idx)
            batch_lengths = lengths[idx].long()
            width = max(int(batch_lengths.max()), 1)  # trim padding to the longest row (CPU: no sync)
            here = epoch["order"][at]
            batch = {"input_ids": epoch["input_ids"][here, :width].long(),
                     "lengths": batch_lengths,  # stays on the CPU: packing reads it there
                     "labels": epoch["labels"][here], "global_size": global_size}
            image_side = self._gather(epoch["rows"][at] if self.on_device else rows[at])
            if self.cached:
                batch["image_features"] = image_side
            else:
                images = image_side["images"]  # (B, S, S) uint8, mirrored here on the device
                batch["images"] = torch.where(epoch["flipped"][at, None, None], images.flip(-1), images)
            yield batch


def _hash_tensor(digest, tensor):
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _load_features(path, shape):
    """The cache file at `path`, memory-mapped (pages are read as batches touch them, and
    processes share them); a file that does not load is deleted, said in one line: None."""
    try:
        features = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        found = {key: tuple(value.shape[:2]) for key, value in features.items()}
        if set(found.values()) != {shape}:
            raise ValueError(f"shapes {found}, expected {shape} first")
        return features
    except Exception as err:  # truncated zip, foreign pickle, wrong shapes: all mean "build again"
        print(f"warning: feature cache {path} does not load ({one_line(err)}): deleted, building it again",
              file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        return None


def cached_features(model, images, cache_dir, device, *, flips, amp="auto", batch_size=256,
                    show_progress=True):
    """Trunk features of every image (and of its mirror when `flips`), computed once.

    A frozen trunk makes the features a pure function of (image bytes, trunk weights,
    preprocessing) and of the arithmetic: `amp` (as train.py's --amp) and the device kind
    (CUDA runs fp32 convolutions in TF32) change the numbers, so all of these make the cache
    key and a stale cache cannot be read. Stored as float16 [V,N,...] (V = 2 with flips):
    half the memory of fp32, and its relative error (~5e-4) is far below what training notices.
    Returns (features, path).
    """
    device = torch.device(device)
    mixed_precision, dtype = autocast(device, amp)
    digest = hashlib.sha256()
    _hash_tensor(digest, images)
    digest.update(f"{model.feature_fingerprint()}|flips={flips}|{device.type}|{dtype}".encode())
    path = Path(cache_dir) / f"features-{digest.hexdigest()[:24]}.pt"
    shape = (2 if flips else 1, len(images))
    if path.exists() and (features := _load_features(path, shape)) is not None:
        return features, path
    if device.type == "cuda":  # NHWC convolutions run faster on tensor cores; same numbers
        model.to(memory_format=torch.channels_last)
    model.eval()
    # Filled in place batch after batch: the peak is the result plus one batch (building
    # lists of chunks and concatenating them held three copies of the result at once).
    features = {}  # name -> float16 (V, N, ...), allocated at the first batch's shapes
    steps = [(v, i) for v in range(shape[0]) for i in range(0, len(images), batch_size)]
    with torch.inference_mode(), mixed_precision:
        for v, i in progress(steps, "caching features", enabled=show_progress):
            batch = images[i:i + batch_size].to(device, non_blocking=True)
            for name, value in model.image_features(batch.flip(-1) if v else batch).items():
                if name not in features:
                    features[name] = torch.empty((*shape, *value.shape[1:]), dtype=torch.float16)
                features[name][v, i:i + len(batch)] = value  # cast to float16, copied to the host
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:  # a killed or concurrent run never leaves a half-written cache
        torch.save(features, tmp)
    del features  # read back memory-mapped, as a later run would
    return _load_features(path, shape), path

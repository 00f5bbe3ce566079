"""The prepared data set in memory: shards, the text pool, batches, the feature cache.

    from data import load_split, Batches
    train = load_split("data/processed", "train")
    for batch in Batches(train, batch_size=64, device="cpu", shuffle=True):
        logits = model(batch["input_ids"], batch["lengths"], images=batch["images"])

prepare_data.py writes data/processed; this module only reads it (and writes the feature
cache under data/cache). The whole data set is a few hundred MB of uint8, so it lives in
memory and is served without a DataLoader (as cifar10-airbench does), in three parts as
torch's data tools divide the work: which rows make a batch (BatchOrder), how a batch is
assembled (Batches), how it reaches the device (DeviceFeed). No model, no file helper here.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distributed import broadcast, gather
from runtime import DataError, atomic_write, autocast, fits_on_device, one_line, progress

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
# bump when the shard layout changes; readers refuse other versions
FORMAT_VERSION = 1
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


def redraw_texts(split, text_pool, generator):
    """A random pool text of each image's class -> (input_ids [N,L], lengths [N]). Classes
    without texts (Disgust and Neutral under --unpaired random) get any text, so the text
    carries no signal for them (the reference re-draws texts every epoch)."""
    labels = split["labels"]
    choice = torch.empty(len(labels), dtype=torch.long)
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().squeeze(1)
        candidates = (text_pool["labels"] == cls).nonzero().squeeze(1)
        if len(candidates) == 0:
            candidates = torch.arange(len(text_pool["labels"]))
        picks = torch.randint(len(candidates), (len(rows),), generator=generator)
        choice[rows] = candidates[picks]
    return text_pool["input_ids"][choice], text_pool["lengths"][choice]


class BatchOrder:
    """Which rows make each batch, in which order, and which of them are this rank's (a batch
    sampler, as torch.utils.data's BatchSampler and DistributedSampler divide that work).

    Shuffled (training): a seeded permutation grouped into batches of similar text length, and
    under torchrun every rank draws the same batches and is dealt its rows of each one
    (`batch_size` is the global batch): rank r takes rows r, r + W, r + 2W, ... A batch is sorted
    by text length, so a dealt slice spans the batch's lengths, where a contiguous one would hold
    only its short or only its long texts. A last batch too small to give every rank a row is
    dropped (under torchrun only). In order (evaluation): each rank a contiguous share of the rows.
    """

    def __init__(self, n, batch_size, *, shuffle, rank=0, world_size=1):
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size

    def __len__(self):
        if not self.shuffle:
            return len(self._share().split(self.batch_size))
        batches = -(-self.n // self.batch_size)
        return batches - (0 < self.n % self.batch_size < self.world_size)

    def _share(self):
        """This rank's contiguous share of the row indices (all of them on one process)."""
        return torch.arange(self.n).tensor_split(self.world_size)[self.rank]

    def _bucketed(self, lengths, generator):
        """Shuffled batches of similar text length: sort each window of 32 batches by length,
        cut it into batches, shuffle the batches. Padding is trimmed per batch, so this removes
        most of the Transformer's work on pad tokens (tweets run from 3 to 64 tokens) while every
        epoch still sees a new random grouping."""
        order = torch.randperm(self.n, generator=generator)
        window = 32 * self.batch_size
        batches = []
        for start in range(0, self.n, window):
            chunk = order[start:start + window]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            batches += list(chunk.split(self.batch_size))
        shuffled = torch.randperm(len(batches), generator=generator)
        return [batches[i] for i in shuffled]

    def draw(self, lengths, generator):
        """One pass: [(this rank's row indices, the size of the whole batch)], batch after batch."""
        if not self.shuffle:
            return [(rows, len(rows)) for rows in self._share().split(self.batch_size)]
        return [(rows[self.rank::self.world_size], len(rows))
                for rows in self._bucketed(lengths, generator) if len(rows) >= self.world_size]


class DeviceFeed:
    """How the image side of each batch reaches the device, the step never waiting for the host.

    The sources (dicts of [R, ...] tensors) move to the device once when they fit there
    (`on_device=None`: when they leave a margin of free memory) and each batch is gathered on the
    device. Otherwise each batch is gathered on the host into one pinned buffer, reused every
    step, and copied without blocking; a CUDA event says when the last copy has left it.
    """

    def __init__(self, sources, device, batch_size, on_device=None):
        self.device = device
        self.on_device = fits_on_device(sources, device) if on_device is None else on_device
        if self.on_device:
            self.sources = {k: v.to(device) for k, v in sources.items()}
            return
        self.sources = sources
        self.buffers = {k: torch.empty((batch_size, *v.shape[1:]), dtype=v.dtype,
                                       pin_memory=device.type == "cuda")
                        for k, v in sources.items()}
        self.copied = None

    def gather(self, rows):
        """`rows` of every source, on the device: `rows` on the device when the sources are."""
        if self.on_device:
            return {k: v.index_select(0, rows) for k, v in self.sources.items()}
        if self.copied is not None:
            # the previous batch has left the buffer (not: its step has run)
            self.copied.synchronize()
        batch = {}
        for k, v in self.sources.items():
            buffer = self.buffers[k][:len(rows)]
            torch.index_select(v, 0, rows, out=buffer)
            batch[k] = buffer.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()
        return batch


class Batches:
    """One split served in batches, all randomness from one seeded generator.

    Each pass (epoch) draws, in this order, a text for every image from `text_pool`, a flip
    coin per image, and the batches (BatchOrder). `features` replaces images with cached trunk
    features, dicts of [V,N,...] where V=2 holds the mirrored images' too. The image side goes
    through a DeviceFeed; text, lengths and labels move once an epoch. `global_size`: the whole
    batch's size, for the loss's mean. `generator.get_state()` after a pass is all a resume needs.
    """

    def __init__(self, split, batch_size, device, *, features=None, shuffle=False,
                 flip=False, text_pool=None, seed=0, rank=0, world_size=1, on_device=None):
        self.split = split
        self.features = features
        self.device = torch.device(device)
        self.flip = flip
        self.text_pool = text_pool
        self.generator = torch.Generator().manual_seed(seed)
        self.order = BatchOrder(len(split["labels"]), batch_size, shuffle=shuffle, rank=rank,
                                world_size=world_size)
        self.cached = features is not None
        if self.cached and flip and next(iter(features.values())).shape[0] < 2:
            raise ValueError("flip needs features of flipped images (a cache built with flips=True)")
        # Rows of [V*N, ...]: row v*N + i is image i as stored (v=0) or mirrored (v=1).
        sources = ({k: v.flatten(0, 1) for k, v in features.items()} if self.cached
                   else {"images": split["images"]})
        self.feed = DeviceFeed(sources, self.device, batch_size, on_device)

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        n = len(self.split["labels"])
        input_ids = self.split["input_ids"]
        lengths = self.split["lengths"]
        if self.text_pool is not None:
            input_ids, lengths = redraw_texts(self.split, self.text_pool, self.generator)
        flipped = (torch.rand(n, generator=self.generator) < 0.5 if self.flip
                   else torch.zeros(n, dtype=torch.bool))
        mine = self.order.draw(lengths, self.generator)
        # (n,) sample indices, batch after batch
        order = torch.cat([rows for rows, _ in mine])
        rows = flipped[order].long() * n + order if self.cached else order
        # The epoch's text, lengths, labels and indices move to the device once; each step
        # slices them there, so the model finds lengths on its device and copies nothing.
        epoch = {"input_ids": input_ids, "lengths": lengths.long(), "labels": self.split["labels"],
                 "order": order, "flipped": flipped[order], "rows": rows}
        epoch = {k: v.to(self.device, non_blocking=True) for k, v in epoch.items()}
        start = 0
        for idx, global_size in mine:
            at = slice(start, start + len(idx))
            start += len(idx)
            # trim padding to the longest row, read from the host copy: no sync
            width = max(int(lengths[idx].max()), 1)
            here = epoch["order"][at]
            batch = {"input_ids": epoch["input_ids"][here, :width].long(),
                     "lengths": epoch["lengths"][here],
                     "labels": epoch["labels"][here],
                     "global_size": global_size}
            image_side = self.feed.gather(epoch["rows"][at] if self.feed.on_device else rows[at])
            if self.cached:
                batch["image_features"] = image_side
            else:
                # (B, S, S) uint8, mirrored here on the device
                images = image_side["images"]
                batch["images"] = torch.where(epoch["flipped"][at, None, None], images.flip(-1), images)
            yield batch


def _load_features(path, shape, warn=True):
    """The cache file at `path`, memory-mapped (pages are read as batches touch them, and
    processes share them); a file that does not load is deleted, said in one line (when
    `warn`): None."""
    try:
        features = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        found = {key: tuple(value.shape[:2]) for key, value in features.items()}
        if set(found.values()) != {shape}:
            raise ValueError(f"shapes {found}, expected {shape} first")
        return features
    except Exception as err:
        # truncated zip, foreign pickle, wrong shapes: all mean "build again"
        if warn:
            print(f"warning: feature cache {path} does not load ({one_line(err)}): deleted, building it again",
                  file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        return None


def _process_group():
    """(rank, world size) of the initialized process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_ranks(failure, what):
    """Every rank passes its own failure (None, or one line); when any rank's is not None, every
    rank raises one DataError naming each failed rank. One process raises at once instead."""
    failed = [f"rank {rank}: {failure}" for rank, failure in enumerate(gather(failure)) if failure is not None]
    if failed:
        raise DataError(f"{what} failed on {'; '.join(failed)}. No cache was written: fix it and run again")


def _node_writes(write):
    """`write()` on the first process of each node (LOCAL_RANK 0), which keeps the node's copy of
    the cache -> None, or its failure in one line (a --cache-dir under a file, a full disk: torch.save
    says the latter with a RuntimeError), for _check_ranks, on one process as on many."""
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return None
    try:
        write()
    except Exception as err:
        return one_line(err)
    return None


def _compute(model, images, views, device, amp, batch_size, show_progress):
    """Every view's features, float16 {name: [V*N, ...]} (row v*N + i: image i, mirrored when v = 1).

    Under torchrun each rank computes a contiguous share of the batches one process would
    compute (the same batches, so the same numbers), rank 0 the largest, and then sends its rows
    to every other rank. The ranks compare notes after each turn, so a failure on any rank stops
    every rank within one batch, not at a collective's timeout."""
    rank, world_size = _process_group()
    mixed_precision, _ = autocast(device, amp)
    n = len(images)
    # (view, first image) of each batch, and each rank's contiguous share of them
    steps = [(view, i) for view in range(views) for i in range(0, n, batch_size)]
    shares = [steps[part[0]:part[-1] + 1] if len(part) else [] for part in
              torch.arange(len(steps)).tensor_split(world_size)]
    # NHWC convolutions run faster on tensor cores; same numbers
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.eval()
    # Filled in place batch after batch: the peak is the result plus one batch.
    features = {}
    for turn in progress(range(len(shares[0])), "caching features", enabled=show_progress):
        failure = None
        if turn < len(shares[rank]):
            view, i = shares[rank][turn]
            try:
                batch = images[i:i + batch_size].to(device, non_blocking=True)
                with torch.inference_mode(), mixed_precision:
                    values = model.image_features(batch.flip(-1) if view else batch)
                for name, value in values.items():
                    if name not in features:
                        features[name] = torch.empty((views * n, *value.shape[1:]), dtype=torch.float16)
                    # cast to float16, copied to the host
                    features[name][view * n + i:view * n + i + len(batch)] = value
            except Exception as err:
                if world_size == 1:
                    raise
                failure = one_line(err)
        _check_ranks(failure, "building the feature cache")
    if world_size > 1:
        # the rows [first, end) each share filled: steps are view-major, so a share's rows are one run
        bounds = [(share[0][0] * n + share[0][1], share[-1][0] * n + min(share[-1][1] + batch_size, n))
                  for share in shares if share]
        _exchange(features, bounds, device)
    return features


def _exchange(features, bounds, device):
    """Each rank's rows [first, end) (`bounds`, one pair a rank that computed any) broadcast from
    it into every other rank's copy: one broadcast a rank and feature. NCCL moves device tensors
    only, so there a share travels through the device, one at a time."""
    # rank 0 computed the first batch: the names and shapes every rank allocates
    shapes = broadcast({name: tuple(value.shape) for name, value in features.items()})
    for name, shape in shapes.items():
        if name not in features:
            features[name] = torch.empty(shape, dtype=torch.float16)
    wire = device if dist.get_backend() == "nccl" else torch.device("cpu")
    for source, (first, end) in enumerate(bounds):
        for value in features.values():
            part = value[first:end].to(wire)
            dist.broadcast(part, src=source)
            value[first:end] = part


def cached_features(model, images, cache_dir, device, *, flips, amp="auto", batch_size=256,
                    show_progress=True):
    """Trunk features of every image (and of its mirror when `flips`), computed once.

    A frozen trunk makes the features a pure function of (image bytes, trunk weights,
    preprocessing) and of the arithmetic: `amp` (as train.py's --amp) and the device kind
    (CUDA runs fp32 convolutions in TF32) change the numbers, so all of these make the cache
    key and a stale cache cannot be read. Stored as float16 [V,N,...] (V = 2 with flips):
    half the memory of fp32, and its relative error (~5e-4) is far below what training notices.

    Under torchrun (a process group initialized) every rank calls this. When every rank finds
    the file in its own cache_dir they read it; else they build it together (_compute: each
    rank a share, sent to the others through the process group), and the first process of each
    node (LOCAL_RANK 0) writes its node's copy, so nodes need no shared disk; on a shared one
    they write the same bytes, each through its own temporary name. A failure on any rank ends
    every rank with one DataError line. Returns (features, path).
    """
    device = torch.device(device)
    _, dtype = autocast(device, amp)
    digest = hashlib.sha256()
    digest.update(images.contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"{model.feature_fingerprint()}|flips={flips}|{device.type}|{dtype}".encode())
    path = Path(cache_dir) / f"features-{digest.hexdigest()[:24]}.pt"
    shape = (2 if flips else 1, len(images))
    rank, _ = _process_group()
    features = _load_features(path, shape, warn=rank == 0) if path.exists() else None
    # Every rank reads its copy, or they all build it again, together.
    found = gather((path.name, features is not None))
    if len({name for name, _ in found}) > 1:
        raise DataError(f"the ranks' feature cache keys differ ({', '.join(name for name, _ in found)}): "
                        "every rank must hold the same trunk and images")
    if all(loaded for _, loaded in found):
        return features, path
    # the folder first: an unwritable --cache-dir fails now, not after the features are computed
    _check_ranks(_node_writes(lambda: path.parent.mkdir(parents=True, exist_ok=True)), "making the cache folder")
    features = _compute(model, images, shape[0], device, amp, batch_size, show_progress)
    features = {name: value.unflatten(0, shape) for name, value in features.items()}

    def write():
        # a killed or concurrent run never leaves a half-written cache
        with atomic_write(path) as tmp:
            torch.save(features, tmp)

    _check_ranks(_node_writes(write), "writing the feature cache")
    return features, path

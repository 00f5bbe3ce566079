"""The prepared data set in memory: shards, the text pool, batches, the feature cache, and
sentences encoded into token ids.

    from data import load_split, Batches
    train = load_split("data/processed", "train")
    for batch in Batches(train, batch_size=64, device="cpu", shuffle=True):
        logits = model(batch["input_ids"], batch["lengths"], images=batch["images"])

prepare_data.py writes data/processed. The whole data set is a few hundred MB of uint8, so it
stays in memory and is served without a DataLoader, as in cifar10-airbench: BatchOrder picks the
rows of each batch, Batches assembles a batch, and DeviceFeed moves its images to the device.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime import DataError, atomic_write, autocast, broadcast, fits_on_device, gather, one_line, progress

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
# bump when the shard layout changes; readers refuse other versions
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# A missing face: mid-gray, no face and no contrast. The ablation, --modality-dropout and the
# demo without --image all use this one blank image, so a missing face is one input the model knows.
BLANK_PIXEL = 128


def _found(path):
    if not path.exists():
        raise DataError(f"{path} not found: run `python prepare_data.py` first (or pass --data)")
    return path


def _load(path):
    blob = torch.load(_found(path), map_location="cpu", weights_only=True)
    if blob.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {blob.get('version')}, this code reads "
                        f"{FORMAT_VERSION}: rerun `python prepare_data.py --force`")
    return blob


def load_meta(processed_dir):
    return json.loads(_found(Path(processed_dir) / "meta.json").read_text())


def load_tokenizer(processed_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(_found(Path(processed_dir) / "tokenizer.json")))


def load_split(processed_dir, split):
    """All shards of one split concatenated: images uint8 [N,S,S], labels int64 [N],
    input_ids int32 [N,L], lengths int16 [N]. meta.json names the shards and is written
    last, so a half-written data set is never read."""
    meta = load_meta(processed_dir)
    if meta.get("version") != FORMAT_VERSION or split not in meta.get("shards", {}):
        raise DataError(f"{processed_dir}/meta.json is from another version of this project: "
                        "rerun `python prepare_data.py --force`")
    shards = [_load(Path(processed_dir) / name) for name in meta["shards"][split]]
    keys = ("images", "labels", "input_ids", "lengths")
    return {key: torch.cat([shard[key] for shard in shards]) for key in keys}


def load_text_pool(processed_dir):
    """The whole tokenized train text pool: input_ids [T,L], lengths [T], labels [T] (image class)."""
    blob = _load(Path(processed_dir) / "texts-train.pt")
    return {key: blob[key] for key in ("input_ids", "lengths", "labels")}


def redraw_texts(split, text_pool, generator):
    """A random pool text of each image's class -> (input_ids [N,L], lengths [N]), as the
    reference draws texts again every epoch. A class without texts (Disgust and Neutral under
    --unpaired random) gets any text, so that the text carries no signal for it."""
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


# Batches are grouped by text length, so that each one is padded to about its own rows' length:
# sentences run from 3 to 64 tokens (21 on average in the Emotions corpus), and a random batch of
# 64 is padded to 58 of them, 2.7 tokens computed by Model B's Transformer for every real one.
# Sorting within windows of WINDOW batches of a shuffle (Hugging Face's group_by_length, fairseq's
# buckets) pads a batch to 22 and still groups the rows anew every epoch.
WINDOW = 32


class BatchOrder:
    """Which rows make each batch, and which of them are this rank's (torch's BatchSampler and
    DistributedSampler in one). Shuffled (training): a seeded shuffle, rows sorted by text length
    within windows of WINDOW batches, then the batches in a seeded random order. Under torchrun every
    rank draws the same batches (`batch_size` is the global batch) and rank r takes rows r, r + W,
    r + 2W, ... of each: a batch is sorted by length, so these rows span its lengths, where a
    contiguous slice would hold only its short or only its long texts. A last batch too small to give
    every rank a row is dropped. In order (evaluation): each rank takes a contiguous part of the rows
    and serves it sorted by length; metrics.evaluate puts the results back in the rows' order.
    `group_by_length=False` draws plain random batches (bench.py measures what grouping saves)."""

    def __init__(self, n, batch_size, *, shuffle, rank=0, world_size=1, group_by_length=True):
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.window = WINDOW if group_by_length else 1

    def __len__(self):
        if not self.shuffle:
            return len(self._share().split(self.batch_size))
        batches = -(-self.n // self.batch_size)
        return batches - (0 < self.n % self.batch_size < self.world_size)

    def _share(self):
        """This rank's contiguous part of the row indices (all of them on one process)."""
        return torch.arange(self.n).tensor_split(self.world_size)[self.rank]

    def _grouped(self, lengths, generator):
        """Shuffled batches, each sorted by length and, with a window of several batches, of similar lengths."""
        order = torch.randperm(self.n, generator=generator)
        window = self.window * self.batch_size
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
            share = self._share()
            share = share[torch.argsort(lengths[share], stable=True)]
            return [(rows, len(rows)) for rows in share.split(self.batch_size)]
        return [(rows[self.rank::self.world_size], len(rows))
                for rows in self._grouped(lengths, generator) if len(rows) >= self.world_size]


class DeviceFeed:
    """Moves the image side of each batch to the device without making the step wait for the host.
    The sources (dicts of [R, ...] tensors) move to the device once when they fit there, and each batch
    is gathered on the device; otherwise each batch is gathered on the host into one reused pinned
    buffer and copied without blocking."""

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
        """`rows` of every source, on the device; `rows` are on the device when the sources are."""
        if self.on_device:
            return {k: v.index_select(0, rows) for k, v in self.sources.items()}
        if self.copied is not None:
            # wait until the previous batch has left the pinned buffer (not until its step has run)
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
    """One split served in batches. Each pass (epoch) draws, in this order, a text for every image
    from `text_pool`, a coin flip per image, and the batches, all from one seeded generator, so
    `generator.get_state()` after a pass is all that a resume needs. `features` (cached trunk
    features, dicts of [V,N,...], where V = 2 adds the mirrored images) replaces the images. A
    batch's `index` holds its rows' positions in the split, and its `global_size` is the size of
    the whole batch over all ranks, for the mean of the loss."""

    def __init__(self, split, batch_size, device, *, features=None, shuffle=False,
                 flip=False, text_pool=None, seed=0, rank=0, world_size=1, on_device=None,
                 group_by_length=True):
        self.split = split
        self.features = features
        self.device = torch.device(device)
        self.flip = flip
        self.text_pool = text_pool
        self.generator = torch.Generator().manual_seed(seed)
        self.order = BatchOrder(len(split["labels"]), batch_size, shuffle=shuffle, rank=rank,
                                world_size=world_size, group_by_length=group_by_length)
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
            # trim padding to the longest row, read from the host copy so that it does not sync
            width = max(int(lengths[idx].max()), 1)
            here = epoch["order"][at]
            batch = {"input_ids": epoch["input_ids"][here, :width].long(), "lengths": epoch["lengths"][here],
                     "labels": epoch["labels"][here], "index": here, "global_size": global_size}
            image_side = self.feed.gather(epoch["rows"][at] if self.feed.on_device else rows[at])
            if self.cached:
                batch["image_features"] = image_side
            else:
                # (B, S, S) uint8, mirrored here on the device
                images = image_side["images"]
                batch["images"] = torch.where(epoch["flipped"][at, None, None], images.flip(-1), images)
            yield batch


def _load_features(path, shape, warn=True):
    """The cache file at `path`, memory-mapped: pages are read as batches touch them, and processes
    share them. A file that does not load is deleted (with a one-line warning when `warn`) -> None."""
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
    """Every rank passes its own failure (None or one line). When any rank failed, every rank raises
    one DataError that names each failed rank."""
    failed = [f"rank {rank}: {failure}" for rank, failure in enumerate(gather(failure)) if failure is not None]
    if failed:
        raise DataError(f"{what} failed on {'; '.join(failed)}. No cache was written: fix it and run again")


def _node_writes(write):
    """`write()` on the first process of each node (LOCAL_RANK 0), which keeps the node's copy of the cache
    -> None, or its failure in one line (a --cache-dir under a file, a full disk) for _check_ranks."""
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return None
    try:
        write()
    except Exception as err:
        return one_line(err)
    return None


def _compute(model, images, views, device, amp, batch_size, show_progress):
    """Every view's features, float16 {name: [V*N, ...]}; row v*N + i is image i, mirrored when v = 1.
    Under torchrun each rank computes a contiguous part of the batches that one process would compute
    (so the numbers are the same) and sends its rows to the others. The ranks share their failures after
    each batch, so a failure on any rank stops every rank at once, not at a collective's timeout."""
    rank, world_size = _process_group()
    mixed_precision, _ = autocast(device, amp)
    n = len(images)
    # (view, first image) of each batch, and each rank's contiguous part of them (rank 0's is the longest)
    steps = [(view, i) for view in range(views) for i in range(0, n, batch_size)]
    shares = [steps[part[0]:part[-1] + 1] if len(part) else [] for part in
              torch.arange(len(steps)).tensor_split(world_size)]
    # NHWC convolutions run faster on tensor cores, with the same numbers
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
                    # cast to float16 and copied to the host
                    features[name][view * n + i:view * n + i + len(batch)] = value
            except Exception as err:
                if world_size == 1:
                    raise
                failure = one_line(err)
        _check_ranks(failure, "building the feature cache")
    if world_size > 1:
        # steps are view-major, so the rows that each rank filled are one run [first, end)
        bounds = [(share[0][0] * n + share[0][1], share[-1][0] * n + min(share[-1][1] + batch_size, n))
                  for share in shares if share]
        _exchange(features, bounds, device)
    return features


def _exchange(features, bounds, device):
    """Broadcasts each rank's rows [first, end) (`bounds`: one pair per rank that computed any) into
    every other rank's copy. NCCL moves only device tensors, so there each part travels through the device."""
    # rank 0 computed the first batch, so it knows the names and shapes that every rank allocates
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
    """Trunk features of every image (and of its mirror when `flips`), computed once -> (features, path).

    A frozen trunk makes the features a pure function of the image bytes, the trunk weights, the
    preprocessing and the arithmetic: `amp` and the device kind (CUDA runs fp32 convolutions in
    TF32) change the numbers, so all of them make the cache key and a stale cache is never read.
    Stored as float16 [V,N,...]: half the memory of fp32, with a relative error (about 5e-4) far
    below what training notices. Under torchrun every rank calls this: the ranks read their own
    copies, or compute the features together and the first process of each node writes its node's
    copy, so nodes need no shared disk. A failure on any rank ends every rank with one DataError line.
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
        with atomic_write(path) as tmp:
            torch.save(features, tmp)

    _check_ranks(_node_writes(write), "writing the feature cache")
    return features, path


def encode_texts(tokenizer, texts, max_len):
    """Tokenize sentences -> input_ids int32 [N, max_len] (0 = pad, right-padded), lengths int16 [N].
    prepare_data.py and the recognizer both encode here, so a user's sentence is read as the training texts were."""
    input_ids, lengths, _ = encode_counted(tokenizer, texts, max_len)
    return input_ids, lengths


def encode_counted(tokenizer, texts, max_len):
    """encode_texts, plus the number of tokens in each sentence before the cut (a list of N ints):
    a count above max_len means that the model reads only the start of that sentence."""
    encodings = tokenizer.encode_batch(list(texts))
    input_ids = np.zeros((len(encodings), max_len), dtype=np.int32)
    lengths = np.zeros(len(encodings), dtype=np.int16)
    for row, encoding in enumerate(encodings):
        # truncate: max_len keeps nearly every tweet whole
        ids = encoding.ids[:max_len]
        input_ids[row, : len(ids)] = ids
        lengths[row] = len(ids)
    counts = [len(encoding.ids) for encoding in encodings]
    return torch.from_numpy(input_ids), torch.from_numpy(lengths), counts

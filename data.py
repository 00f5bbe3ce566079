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
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from distributed import gather
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


class Batches:
    """One split served in batches, all randomness from one seeded generator.

    Each pass (epoch) draws, in this order, a fresh text for every image from `text_pool`
    (the reference re-draws texts every epoch), a flip coin per image, and (shuffle) a
    permutation grouped into batches of similar text length. `features` replaces images
    with cached trunk features, dicts of [V,N,...] tensors where V=2 holds the flipped
    image's features too. `generator.get_state()` after a pass is all a resume needs.

    Under torchrun (rank, world_size) every rank draws the same shuffled batches and is dealt
    its rows of each one (`batch_size` is the global batch): rank r takes rows r, r + W, r + 2W,
    ... A batch is sorted by text length, so a dealt slice spans the batch's lengths, where a
    contiguous one would hold only its short or only its long texts. `global_size` in each batch
    says how many samples the whole batch holds, so the loss can be the mean over all of them.
    Without shuffle (evaluation) each rank serves a contiguous share of the split instead.

    The image side (features or images) moves to the device once when it fits there
    (`on_device=None`: when it leaves a margin of free memory) and each batch is gathered on
    the device; otherwise each batch is gathered into one pinned buffer, reused every step,
    and copied without blocking. Text, lengths and labels move once an epoch. Either way the
    step loop never waits for the host.
    """

    def __init__(self, split, batch_size, device, *, features=None, shuffle=False,
                 flip=False, text_pool=None, seed=0, rank=0, world_size=1, on_device=None):
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.flip = flip
        self.text_pool = text_pool
        self.rank = rank
        self.world_size = world_size
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
            # CUDA event: the last copy out of the buffers has finished
            self.copied = None

    def __len__(self):
        if not self.shuffle:
            return len(self._share().split(self.batch_size))
        n = len(self.split["labels"])
        batches = -(-n // self.batch_size)
        return batches - (0 < n % self.batch_size < self.world_size)

    def _share(self):
        """This rank's contiguous share of the sample indices (all of them on one process)."""
        return torch.arange(len(self.split["labels"])).tensor_split(self.world_size)[self.rank]

    def _redraw_texts(self):
        """A random pool text of each image's class; classes without texts (Disgust and
        Neutral under --unpaired random) get any text, so the text carries no signal."""
        labels = self.split["labels"]
        pool = self.text_pool
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

    def __iter__(self):
        n = len(self.split["labels"])
        input_ids = self.split["input_ids"]
        lengths = self.split["lengths"]
        if self.text_pool is not None:
            input_ids, lengths = self._redraw_texts()
        flipped = (torch.rand(n, generator=self.generator) < 0.5 if self.flip
                   else torch.zeros(n, dtype=torch.bool))
        if self.shuffle:
            # This rank's rows of each global batch, dealt (rows rank, rank + W, ...): one process
            # takes every row in order. A last batch too small to give every rank a sample is
            # dropped (under torchrun only: fewer than world_size samples an epoch).
            batches = self._bucketed(torch.randperm(n, generator=self.generator), lengths)
            mine = [(idx[self.rank::self.world_size], len(idx))
                    for idx in batches if len(idx) >= self.world_size]
        else:
            mine = [(idx, len(idx)) for idx in self._share().split(self.batch_size)]
        # (n,) sample indices, batch after batch
        order = torch.cat([idx for idx, _ in mine])
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
            image_side = self._gather(epoch["rows"][at] if self.on_device else rows[at])
            if self.cached:
                batch["image_features"] = image_side
            else:
                # (B, S, S) uint8, mirrored here on the device
                images = image_side["images"]
                batch["images"] = torch.where(epoch["flipped"][at, None, None], images.flip(-1), images)
            yield batch


def _hash_tensor(digest, tensor):
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())


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


def _check_ranks(failures, what):
    """One DataError line, raised on every rank, when any rank's entry of `failures` (one per
    rank, from distributed.gather) is not None."""
    failed = [f"rank {rank}: {failure}" for rank, failure in enumerate(failures) if failure is not None]
    if failed:
        raise DataError(f"{what} failed on {'; '.join(failed)}. No cache was written: fix it and run again")


def _compute_share(model, images, shape, device, amp, batch_size, show_progress):
    """This rank's contiguous share of the batches (all of them on one process), computed
    -> ({name: float16 (rows, ...)}, the first row's index in the (V * N) rows of the cache).
    Rank 0's share starts at row 0 and goes straight into tensors of the whole cache. Every rank
    takes as many turns as the largest share and the ranks compare notes after each, so a
    failure on any rank stops every rank within one batch, not at a collective's timeout."""
    rank, world_size = _process_group()
    mixed_precision, _ = autocast(device, amp)
    n = len(images)
    # (view, first image) of each batch: the batches one process computes, so the same numbers
    steps = [(view, i) for view in range(shape[0]) for i in range(0, n, batch_size)]
    mine = steps[len(steps) * rank // world_size:len(steps) * (rank + 1) // world_size]
    first = mine[0][0] * n + mine[0][1] if mine else 0
    last = mine[-1][0] * n + min(mine[-1][1] + batch_size, n) if mine else 0
    rows = shape[0] * n if rank == 0 else last - first
    # NHWC convolutions run faster on tensor cores; same numbers
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.eval()
    # Filled in place batch after batch: the peak is the result plus one batch (building
    # lists of chunks and concatenating them held three copies of the result at once).
    features = {}
    failure = None
    turns = -(-len(steps) // world_size)
    for turn in progress(range(turns), "caching features", enabled=show_progress):
        if failure is None and turn < len(mine):
            view, i = mine[turn]
            try:
                batch = images[i:i + batch_size].to(device, non_blocking=True)
                with torch.inference_mode(), mixed_precision:
                    values = model.image_features(batch.flip(-1) if view else batch)
                for name, value in values.items():
                    # allocated at the first batch's shapes
                    if name not in features:
                        features[name] = torch.empty((rows, *value.shape[1:]), dtype=torch.float16)
                    start = view * n + i - first
                    # cast to float16, copied to the host
                    features[name][start:start + len(batch)] = value
            except Exception as err:
                if world_size == 1:
                    raise
                failure = one_line(err)
        _check_ranks(gather(failure), "building the feature cache")
    return features, first


def _write_cache(path, shape, share, first, rank):
    """Rank 0 puts every rank's share into its own (the whole cache) and writes the one file;
    the other ranks hand theirs over through a file beside it. A failure anywhere is raised on
    every rank, in one line, before anything is written."""
    folder = None
    try:
        failure = None
        part = None
        if rank > 0 and share:
            try:
                folder = Path(tempfile.mkdtemp(prefix=f".{path.stem}-rank{rank}-", dir=path.parent))
                part = folder / "share.pt"
                torch.save(share, part)
            except Exception as err:
                failure = one_line(err)
        parts = gather((failure, part, first))
        _check_ranks([failure for failure, _, _ in parts], "handing over the feature cache shares")
        failure = None
        if rank == 0:
            try:
                for _, part, start in parts[1:]:
                    if part is not None:
                        for name, value in torch.load(part, weights_only=True, mmap=True).items():
                            # rank 0 had no batch of its own when there are fewer batches than ranks
                            if name not in share:
                                share[name] = torch.empty((shape[0] * shape[1], *value.shape[1:]),
                                                          dtype=torch.float16)
                            share[name][start:start + len(value)] = value
                # a killed or concurrent run never leaves a half-written cache
                with atomic_write(path) as tmp:
                    torch.save({name: value.unflatten(0, shape) for name, value in share.items()}, tmp)
            except Exception as err:
                if len(parts) == 1:
                    raise
                failure = one_line(err)
        _check_ranks(gather(failure), "writing the feature cache")
    finally:
        # after rank 0 has read it, or when the build stopped
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def cached_features(model, images, cache_dir, device, *, flips, amp="auto", batch_size=256,
                    show_progress=True):
    """Trunk features of every image (and of its mirror when `flips`), computed once.

    A frozen trunk makes the features a pure function of (image bytes, trunk weights,
    preprocessing) and of the arithmetic: `amp` (as train.py's --amp) and the device kind
    (CUDA runs fp32 convolutions in TF32) change the numbers, so all of these make the cache
    key and a stale cache cannot be read. Stored as float16 [V,N,...] (V = 2 with flips):
    half the memory of fp32, and its relative error (~5e-4) is far below what training notices.

    Under torchrun (a process group initialized) every rank calls this and the ranks build the
    cache together: each computes a contiguous share of the batches (the batches one process
    would compute, so the file is the same, byte for byte), rank 0 writes the one file, and
    every rank loads it. cache_dir must be one folder that every rank sees. A failure on any
    rank ends every rank with one DataError line within a batch.
    Returns (features, path).
    """
    device = torch.device(device)
    _, dtype = autocast(device, amp)
    digest = hashlib.sha256()
    _hash_tensor(digest, images)
    digest.update(f"{model.feature_fingerprint()}|flips={flips}|{device.type}|{dtype}".encode())
    path = Path(cache_dir) / f"features-{digest.hexdigest()[:24]}.pt"
    shape = (2 if flips else 1, len(images))
    rank, _ = _process_group()
    features = _load_features(path, shape, warn=rank == 0) if path.exists() else None
    # Every rank reads the file, or they all build it again, together.
    found = gather((path.name, features is not None))
    if len({name for name, _ in found}) > 1:
        raise DataError(f"the ranks' feature cache keys differ ({', '.join(name for name, _ in found)}): "
                        "every rank must hold the same trunk and images")
    if all(loaded for _, loaded in found):
        return features, path
    features = None
    share, first = _compute_share(model, images, shape, device, amp, batch_size, show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_cache(path, shape, share, first, rank)
    # read back memory-mapped, as a later run would
    del share
    return _load_features(path, shape), path

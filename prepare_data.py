"""Raw data -> data/processed: image shards, token ids, tokenizer, fixed pairs, meta.json.

    python prepare_data.py                                    # download from Kaggle
    python prepare_data.py --source synthetic                 # offline, seeded, ~20 s
    python prepare_data.py --image-dir ~/raf-db --text-csv ~/emotions.csv
    python prepare_data.py --dedupe          # no val/test face with a near-copy in train

Six steps, each skipped when its inputs are unchanged (`--force` redoes them): 1 raw data,
2 images and the leak audit (leaks.py), 3 texts, 4 tokenizer, 5 pairing, 6 shards + meta.json.
Each output is renamed into place before its key (a hash of its inputs) is written, so a
killed run leaves nothing a later run takes for finished work.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

import leaks
from data import CLASSES, FORMAT_VERSION, SPLITS
from images import read_image
from runtime import DataError, atomic_write
from sources import KAGGLE_IMAGES, KAGGLE_TEXTS, TEXT_TO_CLASS, digest, find_image_root, \
    find_text_file, kaggle_download, list_images, read_texts, say, synthetic_raw
from tokenizer import encode_texts, train_tokenizer

UNPAIRED = [c for c in CLASSES if c not in TEXT_TO_CLASS.values()]  # Disgust, Neutral
SHARD_SIZE = 10000


def step(number, name, work, key, force, build):
    """Run step `number` unless its output under `work` was finished with the same key."""
    output, marker = work / f"step{number}-{name}.pt", work / f"step{number}-{name}.key"
    if not force and output.exists() and marker.exists() and marker.read_text() == key:
        say(f"[{number}/6] {name}: done already, skipped (--force redoes it)")
        return torch.load(output, weights_only=True)
    marker.unlink(missing_ok=True)  # from here on, the old output is not finished work
    say(f"[{number}/6] {name} ...")
    start = time.time()
    result = build()
    with atomic_write(output) as tmp:
        torch.save(result, tmp)
    marker.write_text(key)  # after the output: a marker always vouches for a whole file
    say(f"      {name}: {time.time() - start:.1f} s")
    return result


# ---- step 1: raw data --------------------------------------------------------------
def locate(args):
    """Step 1: where the raw image tree and text file are (downloading or generating them)."""
    say("[1/6] raw data ...")
    if args.source == "synthetic" and not (args.image_dir or args.text_csv):
        image_dir, text_csv = synthetic_raw(args.raw_dir, args.seed, args.synthetic_images,
                                            args.synthetic_texts, args.synthetic_copies)
        return image_dir, text_csv, {"kind": "synthetic", "seed": args.seed,
                                     "images_per_class": args.synthetic_images,
                                     "texts": args.synthetic_texts, "copies": args.synthetic_copies}
    if args.image_dir or args.text_csv:
        say(f"      local copies: {args.image_dir or 'images from Kaggle'}, "
            f"{args.text_csv or 'texts from Kaggle'}")
    image_dir = Path(args.image_dir) if args.image_dir else kaggle_download(KAGGLE_IMAGES, args.raw_dir)
    text_csv = Path(args.text_csv) if args.text_csv else kaggle_download(KAGGLE_TEXTS, args.raw_dir)
    if text_csv.is_dir():
        text_csv = find_text_file(text_csv)
    for path in (image_dir, text_csv):
        if not path.exists():
            raise DataError(f"{path} does not exist")
    return image_dir, text_csv, {
        "kind": "local" if args.image_dir or args.text_csv else "kaggle",
        "images": str(args.image_dir) if args.image_dir else KAGGLE_IMAGES,
        "texts": str(args.text_csv) if args.text_csv else KAGGLE_TEXTS}


def stratified_split(rows, labels, fraction, seed, what):
    """(rest, part): `fraction` of `rows` in part, every class in proportion, seeded."""
    try:
        return train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as err:  # e.g. a label with a single example
        raise DataError(f"cannot split the {what} stratified by class ({err}); "
                        "provide more examples of each class") from None


# ---- step 2: images ----------------------------------------------------------------
def read_images(listing, root, size, seed):
    """Decode every file; unreadable ones are skipped and named. No val split: carve 15 % of
    train, stratified and seeded (plain RAF-DB has only train and test). Each image keeps
    its file name (relative to `root`) for the leak audit's examples."""
    result, skipped = {}, []
    for split, files in listing.items():
        images, labels, names = [], [], []
        for path, name in files:
            try:
                images.append(read_image(path, size))
            except DataError:
                skipped.append(str(path))
                continue
            labels.append(CLASSES.index(name))
            names.append(path.relative_to(root).as_posix())
        result[split] = {"images": torch.from_numpy(np.stack(images)) if images
                         else torch.zeros(0, size, size, dtype=torch.uint8),
                         "labels": torch.tensor(labels, dtype=torch.int64), "files": names}
    if "val" not in result:
        train = result["train"]
        keep, val = stratified_split(np.arange(len(train["labels"])), train["labels"].numpy(),
                                     0.15, seed, "train images into train and val")
        result["val"], result["train"] = (
            {"images": train["images"][rows], "labels": train["labels"][rows],
             "files": [train["files"][i] for i in rows]} for rows in (np.sort(val), np.sort(keep)))
    for split in SPLITS:
        if len(result[split]["labels"]) == 0:
            raise DataError(f"no readable images in the {split} split of the image folder")
    result["skipped"] = skipped
    return result


def read_and_audit(listing, root, size, seed):
    """Step 2: the images of every split, then the near-copies across splits (leaks.py)."""
    result = read_images(listing, root, size, seed)
    result["leaks"], near_train = leaks.audit({s: result[s]["images"].numpy() for s in SPLITS},
                                              {s: result[s]["files"] for s in SPLITS})
    result["near_train"] = {split: torch.from_numpy(near) for split, near in near_train.items()}
    return result


# ---- step 3: texts -----------------------------------------------------------------
def split_texts(path, seed):
    """Normalize, drop empty rows and exact duplicates (before splitting, so no sentence is
    in two splits), then split 70/15/15 stratified by label."""
    texts, labels, encoding = read_texts(path)
    seen, clean, clean_labels = set(), [], []
    for text, label in zip(texts, labels):
        text = " ".join(text.split())
        if text and text not in seen:
            seen.add(text)
            clean.append(text)
            clean_labels.append(label)
    index = np.arange(len(clean))
    train, rest = stratified_split(index, clean_labels, 0.3, seed, "texts 70/15/15")
    val, test = stratified_split(rest, [clean_labels[i] for i in rest], 0.5, seed, "texts 70/15/15")
    result = {split: {"texts": [clean[i] for i in sorted(rows)],
                      "labels": [clean_labels[i] for i in sorted(rows)]}
              for split, rows in zip(SPLITS, (train, val, test))}
    result["dropped"], result["encoding"] = len(texts) - len(clean), encoding
    return result


# ---- step 5: pairing ---------------------------------------------------------------
def pair_texts(image_labels, text_classes, classes, unpaired, rng):
    """For each image, the index of a text of the same split and class: each class's texts
    in a seeded order, used evenly (every text once before any twice). Images of classes
    without texts (Disgust, Neutral) get any text under 'random'."""
    text_classes = np.asarray(text_classes)
    choice = np.full(len(image_labels), -1, dtype=np.int64)
    for index, name in enumerate(classes):
        rows = np.flatnonzero(image_labels == index)
        if len(rows) == 0:
            continue
        pool = (np.arange(len(text_classes)) if name in UNPAIRED and unpaired == "random"
                else np.flatnonzero(text_classes == name))
        if len(pool) == 0:
            raise DataError(f"no texts of class {name} in this split: too few texts")
        rounds = -(-len(rows) // len(pool))
        order = np.concatenate([rng.permutation(pool) for _ in range(rounds)])
        choice[rows] = order[:len(rows)]
    return choice


def pair_all(images, texts, unpaired, dedupe, seed):
    classes = [c for c in CLASSES if not (unpaired == "drop" and c in UNPAIRED)]
    rng = np.random.default_rng(seed)
    pairs, dropped = {}, {}
    for split in SPLITS:
        names = np.array(CLASSES)[images[split]["labels"].numpy()]
        wanted = np.isin(names, classes)  # 'drop' removes Disgust and Neutral
        if split in images["near_train"]:  # val, test
            drop = images["near_train"][split].numpy() & dedupe
            dropped[split] = int((wanted & drop).sum())
            wanted &= ~drop
        keep = np.flatnonzero(wanted)
        labels = np.array([classes.index(n) for n in names[keep]], dtype=np.int64)
        text_classes = [TEXT_TO_CLASS[label] for label in texts[split]["labels"]]
        pairs[split] = {"image_rows": torch.from_numpy(keep), "labels": torch.from_numpy(labels),
                        "text_rows": torch.from_numpy(pair_texts(labels, text_classes, classes,
                                                                 unpaired, rng))}
    return {"classes": classes, "pairs": pairs, "dropped": dropped}


# ---- step 6: shards and meta.json --------------------------------------------------
def write_outputs(out, images, texts, tokenizer_json, paired, args, sources, key):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(tokenizer_json)
    classes = paired["classes"]
    (out / "meta.json").unlink(missing_ok=True)  # the finished-data marker goes first ...
    for old in out.glob("*-[0-9][0-9][0-9][0-9][0-9].pt"):
        old.unlink()
    encoded = {split: encode_texts(tokenizer, texts[split]["texts"], args.max_len) for split in SPLITS}
    shards, counts = {}, {}
    for split in SPLITS:
        pairs = paired["pairs"][split]
        input_ids, lengths = encoded[split]
        rows, text_rows = pairs["image_rows"], pairs["text_rows"]
        shards[split] = []
        for number, start in enumerate(range(0, len(rows), SHARD_SIZE)):
            part = slice(start, start + SHARD_SIZE)
            name = f"{split}-{number:05d}.pt"
            with atomic_write(out / name) as tmp:
                # clone(): a slice is a view, and torch.save writes a view's whole storage
                torch.save({"version": FORMAT_VERSION, "images": images[split]["images"][rows[part]],
                            "labels": pairs["labels"][part].clone(),
                            "input_ids": input_ids[text_rows[part]],
                            "lengths": lengths[text_rows[part]]}, tmp)
            shards[split].append(name)
        counts[split] = {c: int((pairs["labels"] == i).sum()) for i, c in enumerate(classes)}
        say(f"      {split}: {len(rows)} pairs in {len(shards[split])} shard(s)")
    input_ids, lengths = encoded["train"]  # the pool: every train text, paired or not
    pool_labels = [classes.index(TEXT_TO_CLASS[n]) for n in texts["train"]["labels"]]
    with atomic_write(out / "texts-train.pt") as tmp:
        torch.save({"version": FORMAT_VERSION, "input_ids": input_ids, "lengths": lengths,
                    "labels": torch.tensor(pool_labels, dtype=torch.int64)}, tmp)
    with atomic_write(out / "tokenizer.json") as tmp:
        tmp.write_text(tokenizer_json)
    import PIL
    import sklearn
    import tokenizers
    meta = {"version": FORMAT_VERSION, "key": key, "classes": classes, "shards": shards,
            "image_size": args.image_size, "max_len": args.max_len,
            "vocab_size": tokenizer.get_vocab_size(), "seed": args.seed, "unpaired": args.unpaired,
            "sources": sources, "counts": counts,
            "text_counts": {s: len(texts[s]["texts"]) for s in SPLITS},
            "texts_dropped": texts["dropped"], "truncated_texts": int((lengths >= args.max_len).sum()),
            "skipped_files": images["skipped"], "text_encoding": texts["encoding"],
            "leaks": {**images["leaks"], "dedupe": args.dedupe, "dropped": paired["dropped"]},
            "text_to_class": TEXT_TO_CLASS,
            "versions": {"torch": torch.__version__.split("+")[0], "numpy": np.__version__,
                         "pillow": PIL.__version__, "tokenizers": tokenizers.__version__,
                         "scikit-learn": sklearn.__version__}}
    with atomic_write(out / "meta.json") as tmp:  # ... and comes back last
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=["kaggle", "synthetic"], default="kaggle")
    p.add_argument("--image-dir", help="a local image tree instead of the download")
    p.add_argument("--text-csv", help="a local text file instead of the download")
    p.add_argument("--raw-dir", default="data/raw")
    p.add_argument("--out", default="data/processed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=75)
    p.add_argument("--vocab-size", type=int, default=5000)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--unpaired", choices=["random", "drop"], default="random",
                   help="Disgust/Neutral (no texts): random texts, or drop the classes")
    p.add_argument("--synthetic-images", default="300,50,50",
                   help="synthetic faces per class in train,val,test (real size: 4286,1072,600)")
    p.add_argument("--synthetic-texts", type=int, default=6000, help="(real size: 417000)")
    p.add_argument("--synthetic-copies", type=float, default=0.0, metavar="FRACTION",
                   help="plant near-copies of train faces as this fraction of val and test "
                        "(listed in <raw-dir>/synthetic/planted.csv): a leak for the audit to find")
    p.add_argument("--dedupe", action="store_true",
                   help="drop val and test images that have a near-copy in train")
    p.add_argument("--force", action="store_true", help="redo every step")
    args = p.parse_args(argv)
    args.synthetic_images = tuple(int(n) for n in args.synthetic_images.split(","))
    if not 0 <= args.synthetic_copies <= 1:
        p.error("--synthetic-copies is a fraction between 0 and 1")
    return args


def prepare(args):
    out, work = Path(args.out), Path(args.out) / ".steps"
    work.mkdir(parents=True, exist_ok=True)
    image_dir, text_csv, sources = locate(args)
    image_root = find_image_root(image_dir)
    listing = list_images(image_root)
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for f in listing.values() for p, _ in f]
    # the audit's hash and threshold are part of the key: a changed audit redoes the step
    image_key = digest(str(image_root), files, args.image_size, args.seed,
                       leaks.HASH_SIZE, leaks.THRESHOLD)
    images = step(2, "images", work, image_key, args.force,
                  lambda: read_and_audit(listing, image_root, args.image_size, args.seed))
    sizes = ", ".join(f"{split} {len(images[split]['labels'])}" for split in SPLITS)
    say(f"      {sizes} images ({image_root}); {len(images['skipped'])} unreadable files skipped")
    for path in images["skipped"][:10]:
        say(f"      warning: skipped unreadable {path}")
    if any(images["leaks"]["counts"].values()):
        say(f"      warning: {leaks.summary(images['leaks'])}; see meta.json 'leaks', or use --dedupe")
    text_stat = Path(text_csv).stat()
    text_key = digest(str(text_csv), text_stat.st_size, text_stat.st_mtime_ns, args.seed)
    texts = step(3, "texts", work, text_key, args.force, lambda: split_texts(text_csv, args.seed))
    sizes = ", ".join(f"{split} {len(texts[split]['texts'])}" for split in SPLITS)
    say(f"      {sizes} texts ({texts['encoding']}); {texts['dropped']} empty or duplicate rows dropped")
    tokenizer_key = digest(text_key, args.vocab_size)
    tokenizer = step(4, "tokenizer", work, tokenizer_key, args.force,
                     lambda: train_tokenizer(texts["train"]["texts"], args.vocab_size))
    pair_key = digest(image_key, text_key, args.unpaired, args.dedupe, args.seed)
    paired = step(5, "pairing", work, pair_key, args.force,
                  lambda: pair_all(images, texts, args.unpaired, args.dedupe, args.seed))
    say(f"      {len(paired['classes'])} classes, unpaired policy {args.unpaired!r}")
    if args.dedupe:
        say(f"      --dedupe: dropped {paired['dropped']['val']} val and {paired['dropped']['test']} "
            "test images with a near-copy in train")
    key = digest(tokenizer_key, pair_key, args.max_len, sources)
    meta_path = out / "meta.json"
    if not args.force and meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        say(f"[6/6] shards: done already, skipped: {out} is up to date")
        return 0
    say("[6/6] shards ...")
    start = time.time()
    write_outputs(out, images, texts, tokenizer["json"], paired, args, sources, key)
    say(f"      shards: {time.time() - start:.1f} s\ndone: {out}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return prepare(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

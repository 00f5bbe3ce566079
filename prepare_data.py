"""Raw data -> data/processed: image shards, token ids, tokenizer, fixed pairs, meta.json.

    python prepare_data.py                                    # RAF-DB faces from Kaggle
    python prepare_data.py --faces fer2013 --image-size 48    # FER2013 faces, at their own size
    python prepare_data.py --source synthetic                 # offline, seeded, ~20 s
    python prepare_data.py --image-dir ~/raf-db --text-csv ~/emotions.csv
    python prepare_data.py --dedupe     # drops val and test faces with a near-copy in an earlier split

Six steps, each skipped when its inputs are unchanged (`--force` redoes them): 1 raw data,
2 images and the leak audit, 3 texts, 4 the tokenizer, 5 pairing, 6 shards and meta.json.
Each output is renamed into place before its key (a hash of its inputs) is written, so a
killed run leaves nothing that a later run takes for finished work. The helpers that
download, generate and read the raw data, audit the leaks and train the tokenizer are in prep/.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data import CLASSES, FORMAT_VERSION, SPLITS, encode_texts
from prep import leaks
from prep.sources import FACE_SETS, KAGGLE_TEXTS, TEXT_TO_CLASS, describe_encoding, digest, \
    find_image_root, find_text_file, kaggle_download, list_images, read_images, say, \
    split_texts, synthetic_raw
from prep.tokenizer import train_tokenizer
from runtime import DataError, atomic_write, script_parser

SHARD_SIZE = 10000
# Part of the image and text keys; raised when a step's stored output changes shape, so
# that an older run's output is redone rather than misread.
STEP_FORMAT = 2
# The flags each source reads; a flag of the other source is refused, never ignored.
SYNTHETIC_FLAGS = ("synthetic_images", "synthetic_texts", "synthetic_copies")
KAGGLE_FLAGS = ("image_dir", "text_csv", "faces")
# meta.json's "unpaired" when the sentence file covers every class, and --unpaired does nothing
ALL_CLASSES_PAIRED = "none needed: every class has sentences"


def step(number, name, work, key, force, build):
    """Run step `number` unless its output under `work` was finished with the same key."""
    output = work / f"step{number}-{name}.pt"
    marker = work / f"step{number}-{name}.key"
    if not force and output.exists() and marker.exists() and marker.read_text() == key:
        say(f"[{number}/6] {name}: done already, skipped (--force redoes it)")
        return torch.load(output, weights_only=True)
    # from here on, the old output is not finished work
    marker.unlink(missing_ok=True)
    say(f"[{number}/6] {name} ...")
    start = time.time()
    result = build()
    with atomic_write(output) as tmp:
        torch.save(result, tmp)
    # written after the output, so that a marker always vouches for a whole file
    marker.write_text(key)
    say(f"      {name}: {time.time() - start:.1f} s")
    return result


# ---- step 1: raw data --------------------------------------------------------------
def locate(args):
    """Step 1: where the raw image tree and text file are (downloading or generating them)."""
    say("[1/6] raw data ...")
    if args.source == "synthetic":
        image_dir, text_csv = synthetic_raw(args.raw_dir, args.seed, args.synthetic_images,
                                            args.synthetic_texts, args.synthetic_copies)
        return image_dir, text_csv, {"kind": "synthetic", "seed": args.seed,
                                     "images_per_class": args.synthetic_images,
                                     "texts": args.synthetic_texts, "copies": args.synthetic_copies}
    if args.image_dir or args.text_csv:
        say(f"      local copies: {args.image_dir or 'images from Kaggle'}, "
            f"{args.text_csv or 'texts from Kaggle'}")
    faces = FACE_SETS[args.faces]
    image_dir = Path(args.image_dir) if args.image_dir else kaggle_download(faces, args.raw_dir)
    text_csv = Path(args.text_csv) if args.text_csv else kaggle_download(KAGGLE_TEXTS, args.raw_dir)
    if text_csv.is_dir():
        text_csv = find_text_file(text_csv)
    for path in (image_dir, text_csv):
        if not path.exists():
            raise DataError(f"{path} does not exist")
    sources = {"kind": "local" if args.image_dir or args.text_csv else "kaggle"}
    if not args.image_dir:
        sources["faces"] = args.faces
    sources["images"] = str(args.image_dir) if args.image_dir else faces
    sources["texts"] = str(args.text_csv) if args.text_csv else KAGGLE_TEXTS
    return image_dir, text_csv, sources


# ---- step 2: images (step 3, the texts, is prep.sources.split_texts) ---------------
def read_and_audit(listing, root, size, seed):
    """Step 2: the images of every split, then the near-copies across splits (prep/leaks.py)."""
    result = read_images(listing, root, size, seed)
    images = {split: result[split]["images"].numpy() for split in SPLITS}
    files = {split: result[split]["files"] for split in SPLITS}
    result["leaks"], near = leaks.audit(images, files)
    result["near"] = {pair: torch.from_numpy(flags) for pair, flags in near.items()}
    return result


# ---- step 5: pairing ---------------------------------------------------------------
def classes_without_texts(texts):
    """The classes that no sentence of the file is labelled with: Disgust and Neutral in the
    Emotions corpus, none in a file that covers all seven."""
    named = {TEXT_TO_CLASS[name] for split in SPLITS for name in texts[split]["labels"]}
    return [c for c in CLASSES if c not in named]


def pair_texts(image_labels, text_classes, classes, any_text, rng):
    """For each image, the index of a text of the same split and class. Each class's texts are
    shuffled with `rng` and used evenly (every text once before any text twice). The images
    of the classes in `any_text` (those without texts, under --unpaired random) get any text."""
    text_classes = np.asarray(text_classes)
    choice = np.full(len(image_labels), -1, dtype=np.int64)
    for index, name in enumerate(classes):
        rows = np.flatnonzero(image_labels == index)
        if len(rows) == 0:
            continue
        pool = (np.arange(len(text_classes)) if name in any_text
                else np.flatnonzero(text_classes == name))
        if len(pool) == 0:
            raise DataError(f"no texts of class {name} in this split: too few texts")
        rounds = -(-len(rows) // len(pool))
        order = np.concatenate([rng.permutation(pool) for _ in range(rounds)])
        choice[rows] = order[:len(rows)]
    return choice


def pair_all(images, texts, unpaired, dedupe, seed):
    """Step 5: the images each split keeps (the policy's classes; with `dedupe`, none with a
    near-copy in an earlier split), each paired with a text; what was dropped and what the
    audit finds among the images kept."""
    textless = classes_without_texts(texts)
    classes = [c for c in CLASSES if not (unpaired == "drop" and c in textless)]
    any_text = textless if unpaired == "random" else []
    rng = np.random.default_rng(seed)
    near = {pair: flags.numpy() for pair, flags in images["near"].items()}
    copied = leaks.copied_from_earlier(near)
    pairs = {}
    dropped = {}
    kept = {}
    for split in SPLITS:
        names = np.array(CLASSES)[images[split]["labels"].numpy()]
        wanted = np.isin(names, classes)  # 'drop' removes the classes without texts
        if split in copied:  # val, test
            drop = copied[split] & dedupe
            dropped[split] = [images[split]["files"][i] for i in np.flatnonzero(wanted & drop)]
            wanted &= ~drop
        keep = np.flatnonzero(wanted)
        kept[split] = keep
        labels = np.array([classes.index(n) for n in names[keep]], dtype=np.int64)
        text_classes = [TEXT_TO_CLASS[label] for label in texts[split]["labels"]]
        text_rows = pair_texts(labels, text_classes, classes, any_text, rng)
        pairs[split] = {"image_rows": torch.from_numpy(keep), "labels": torch.from_numpy(labels),
                        "text_rows": torch.from_numpy(text_rows)}
    return {"classes": classes, "pairs": pairs, "dropped": dropped,
            "remaining": leaks.remaining(near, kept)}


# ---- step 6: shards and meta.json --------------------------------------------------
def write_shards(out, split, images, input_ids, lengths, pairs):
    """Write one split's pairs as shards of SHARD_SIZE rows; returns their file names."""
    rows = pairs["image_rows"]
    text_rows = pairs["text_rows"]
    names = []
    for number, start in enumerate(range(0, len(rows), SHARD_SIZE)):
        part = slice(start, start + SHARD_SIZE)
        name = f"{split}-{number:05d}.pt"
        with atomic_write(out / name) as tmp:
            # clone(): a slice is a view, and torch.save writes a view's whole storage
            torch.save({"version": FORMAT_VERSION, "images": images[rows[part]],
                        "labels": pairs["labels"][part].clone(),
                        "input_ids": input_ids[text_rows[part]],
                        "lengths": lengths[text_rows[part]]}, tmp)
        names.append(name)
    return names


def write_outputs(out, images, texts, tokenizer_json, paired, args, sources, key):
    """Step 6: the shards, the train text pool, tokenizer.json and, last, meta.json."""
    # imported here for start-up time: only this step needs it
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(tokenizer_json)
    classes = paired["classes"]
    # the finished-data marker goes first ...
    (out / "meta.json").unlink(missing_ok=True)
    for old in out.glob("*-[0-9][0-9][0-9][0-9][0-9].pt"):
        old.unlink()
    encoded = {split: encode_texts(tokenizer, texts[split]["texts"], args.max_len)
               for split in SPLITS}
    shards = {}
    counts = {}
    for split in SPLITS:
        pairs = paired["pairs"][split]
        shards[split] = write_shards(out, split, images[split]["images"], *encoded[split], pairs)
        counts[split] = {c: int((pairs["labels"] == i).sum()) for i, c in enumerate(classes)}
        say(f"      {split}: {len(pairs['image_rows'])} pairs in {len(shards[split])} shard(s)")
    # the pool: every train text, paired or not
    input_ids, lengths = encoded["train"]
    pool_labels = [classes.index(TEXT_TO_CLASS[n]) for n in texts["train"]["labels"]]
    with atomic_write(out / "texts-train.pt") as tmp:
        torch.save({"version": FORMAT_VERSION, "input_ids": input_ids, "lengths": lengths,
                    "labels": torch.tensor(pool_labels, dtype=torch.int64)}, tmp)
    with atomic_write(out / "tokenizer.json") as tmp:
        tmp.write_text(tokenizer_json)
    # the names the file used, which evaluate.py reads to tell the classes with texts
    named = {name for split in SPLITS for name in texts[split]["labels"]}
    meta = {"version": FORMAT_VERSION, "key": key, "classes": classes, "shards": shards,
            "image_size": args.image_size, "max_len": args.max_len,
            "vocab_size": tokenizer.get_vocab_size(), "seed": args.seed,
            "unpaired": args.unpaired if classes_without_texts(texts) else ALL_CLASSES_PAIRED,
            "sources": sources, "counts": counts,
            "text_counts": {s: len(texts[s]["texts"]) for s in SPLITS},
            "texts_dropped": texts["dropped"],
            "truncated_texts": int((lengths >= args.max_len).sum()),
            "skipped_files": images["skipped"], "text_encoding": texts["encoding"],
            "leaks": {**images["leaks"], "dedupe": args.dedupe,
                      "dropped": {split: len(files) for split, files in paired["dropped"].items()},
                      "dropped_files": paired["dropped"], "remaining": paired["remaining"]},
            "text_to_class": {n: c for n, c in TEXT_TO_CLASS.items() if n in named}, "versions": library_versions()}
    # ... and comes back last
    with atomic_write(out / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def library_versions():
    """The versions meta.json records: those that decide the bytes written."""
    # imported here for their versions alone (images.py imports Pillow only when it reads an image)
    import PIL
    import sklearn
    import tokenizers
    return {"torch": torch.__version__.split("+")[0], "numpy": np.__version__,
            "pillow": PIL.__version__, "tokenizers": tokenizers.__version__,
            "scikit-learn": sklearn.__version__}


# ---- the command line --------------------------------------------------------------
def parse_args(argv=None):
    """(args, the flags given on the command line)."""
    p = script_parser(__doc__)
    p.add_argument("--source", choices=["kaggle", "synthetic"], default="kaggle",
                   help="kaggle: download the faces and sentences (or read --image-dir/"
                        "--text-csv); synthetic: generate a seeded offline stand-in")
    p.add_argument("--faces", choices=list(FACE_SETS), default="rafdb",
                   help="the face data set to download: rafdb (the reference's, 75x75) or fer2013 "
                        "(msambare/fer2013, 48x48: add --image-size 48 to keep that size)")
    p.add_argument("--image-dir", metavar="DIR", help="a local image tree instead of the download")
    p.add_argument("--text-csv", metavar="FILE",
                   help="a local sentence file instead of the download: the Emotions corpus's 'text;label' "
                        "lines or 'text,label' CSV (labels 0..5 or names), MELD's CSVs (Utterance, Emotion), "
                        "or GoEmotions' Ekman .tsv with its labels.txt beside it; labels that name Disgust "
                        "and Neutral pair every class with sentences of its own")
    p.add_argument("--raw-dir", default="data/raw", metavar="DIR",
                   help="where downloads and generated data go")
    p.add_argument("--out", default="data/processed", metavar="DIR",
                   help="the folder for the prepared data (train.py --data reads it)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="the seed of the val carve, the text split, the pairing and the synthetic data")
    p.add_argument("--image-size", type=int, default=75, metavar="PIXELS",
                   help="side of the stored faces in pixels; not the trunk's input size "
                        "(train.py --input-size), to which train.py resizes them")
    p.add_argument("--vocab-size", type=int, default=5000, metavar="N",
                   help="the size of the tokenizer's vocabulary, [PAD] and [UNK] included, learned "
                        "from the train texts")
    p.add_argument("--max-len", type=int, default=64, metavar="TOKENS",
                   help="tokens kept per sentence; longer sentences are cut (counted in meta.json)")
    p.add_argument("--unpaired", choices=["random", "drop"], default="random",
                   help="what to do with the classes that have no sentences (Disgust and Neutral in the "
                        "Emotions corpus): pair them with random sentences, or drop them")
    p.add_argument("--synthetic-images", default="300,50,50", metavar="TRAIN,VAL,TEST",
                   help="the number of synthetic faces per class in train,val,test "
                        "(the real size is 4286,1072,600)")
    p.add_argument("--synthetic-texts", type=int, default=6000, metavar="N",
                   help="the number of synthetic sentences (the real size is 417000)")
    p.add_argument("--synthetic-copies", type=float, default=0.0, metavar="FRACTION",
                   help="plant near-copies of train faces as this fraction of val and test "
                        "(listed in <raw-dir>/synthetic/planted.csv): a leak for the audit to find")
    p.add_argument("--dedupe", action="store_true",
                   help="drop the val images that have a near-copy in train, and the test images "
                        "that have one in train or val")
    p.add_argument("--force", action="store_true", help="redo every step")
    args = p.parse_args(argv)
    # Parsed again over a namespace of markers: a flag still holding its marker was not given.
    unset = object()
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return args, {name for name, value in vars(given).items() if value is not unset}


def flag(dest):
    return "--" + dest.replace("_", "-")


def check_flags(args, given):
    """Refuse a flag the chosen source does not read, and values out of range (one line
    each); read --synthetic-images into three counts."""
    if args.source == "synthetic":
        unused = [flag(dest) for dest in KAGGLE_FLAGS if dest in given]
        if unused:
            raise DataError(f"{', '.join(unused)} is not read by --source synthetic, which generates "
                            "its own faces and sentences: drop it, or leave out --source synthetic")
    else:
        unused = [flag(dest) for dest in SYNTHETIC_FLAGS if dest in given]
        if unused:
            raise DataError(f"{', '.join(unused)} is only read by --source synthetic: add "
                            "--source synthetic, or drop it")
    if args.image_dir and "faces" in given:
        raise DataError(f"--faces picks the face data set to download, but --image-dir "
                        f"{args.image_dir} gives the faces: drop one of them")
    for dest in ("image_size", "vocab_size", "max_len", "synthetic_texts"):
        if getattr(args, dest) < 1:
            raise DataError(f"{flag(dest)} must be at least 1, got {getattr(args, dest)}")
    counts = args.synthetic_images.split(",")
    if len(counts) != 3 or not all(n.strip().isdigit() and int(n) > 0 for n in counts):
        raise DataError(f"--synthetic-images takes three counts above 0, train,val,test "
                        f"(e.g. 300,50,50), got {args.synthetic_images!r}")
    args.synthetic_images = tuple(int(n) for n in counts)
    if not 0 <= args.synthetic_copies <= 1:
        raise DataError(f"--synthetic-copies is a fraction between 0 and 1, "
                        f"got {args.synthetic_copies}")


# ---- the six steps -----------------------------------------------------------------
def report_images(images, image_root):
    """The images per split, and the unreadable files skipped (the first ten named)."""
    sizes = ", ".join(f"{split} {len(images[split]['labels'])}" for split in SPLITS)
    say(f"      {sizes} images ({image_root}); {len(images['skipped'])} unreadable files skipped")
    for path in images["skipped"][:10]:
        say(f"      warning: skipped unreadable {path}")


def report_leaks(paired, audit, dedupe):
    """What --dedupe dropped (and what the audit found), then the near-copies in the splits
    as written: one line when there are none, else a warning."""
    if dedupe:
        found = ", ".join(f"{pair} {n}" for pair, n in audit["counts"].items())
        say(f"      --dedupe: dropped {len(paired['dropped']['val'])} val and "
            f"{len(paired['dropped']['test'])} test images with a near-copy in an earlier split "
            f"(the audit found {found})")
    line = leaks.summary(paired["remaining"])
    if any(paired["remaining"]["counts"].values()):
        say(f"      warning: {line}; see meta.json 'leaks', or use --dedupe")
    else:
        say(f"      {line}")


def written_with(meta_path, key):
    """Whether the data set's meta.json was written from exactly these inputs."""
    return meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key


def prepare(args):
    """The six steps, each announced with its counts; 0 when the data set is written."""
    out = Path(args.out)
    work = out / ".steps"
    image_dir, text_csv, sources = locate(args)
    image_root = find_image_root(image_dir)
    listing = list_images(image_root)
    # made only after the raw data are found good, so that a bad tree leaves nothing under --out
    work.mkdir(parents=True, exist_ok=True)
    files = [(str(path), path.stat().st_size, path.stat().st_mtime_ns)
             for split in listing.values() for path, _ in split]
    # the audit's hash and threshold are part of the key: a changed audit redoes the step
    image_key = digest(str(image_root), files, args.image_size, args.seed,
                       leaks.HASH_SIZE, leaks.THRESHOLD, STEP_FORMAT)
    images = step(2, "images", work, image_key, args.force,
                  lambda: read_and_audit(listing, image_root, args.image_size, args.seed))
    report_images(images, image_root)
    text_stat = Path(text_csv).stat()
    text_key = digest(str(text_csv), text_stat.st_size, text_stat.st_mtime_ns, args.seed,
                      STEP_FORMAT)
    texts = step(3, "texts", work, text_key, args.force, lambda: split_texts(text_csv, args.seed))
    sizes = ", ".join(f"{split} {len(texts[split]['texts'])}" for split in SPLITS)
    say(f"      {sizes} texts ({describe_encoding(texts['encoding'])}); "
        f"{texts['dropped']} empty or duplicate rows dropped")
    tokenizer_key = digest(text_key, args.vocab_size)
    tokenizer = step(4, "tokenizer", work, tokenizer_key, args.force,
                     lambda: train_tokenizer(texts["train"]["texts"], args.vocab_size))
    pair_key = digest(image_key, text_key, args.unpaired, args.dedupe, args.seed)
    paired = step(5, "pairing", work, pair_key, args.force,
                  lambda: pair_all(images, texts, args.unpaired, args.dedupe, args.seed))
    if classes_without_texts(texts):
        say(f"      {len(paired['classes'])} classes, unpaired policy {args.unpaired!r}")
    else:
        say(f"      {len(paired['classes'])} classes, every class has sentences: --unpaired has nothing to do")
    report_leaks(paired, images["leaks"], args.dedupe)
    key = digest(tokenizer_key, pair_key, args.max_len, sources)
    if not args.force and written_with(out / "meta.json", key):
        say(f"[6/6] shards: done already, skipped: {out} is up to date")
        return 0
    say("[6/6] shards ...")
    start = time.time()
    write_outputs(out, images, texts, tokenizer["json"], paired, args, sources, key)
    say(f"      shards: {time.time() - start:.1f} s\ndone: {out}")
    return 0


def main(argv=None):
    args, given = parse_args(argv)
    try:
        check_flags(args, given)
        return prepare(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

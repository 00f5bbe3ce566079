"""Where the raw data come from, and how they are read into train, val and test: the Kaggle
downloads, local copies in every layout that users have, and the synthetic generator. Every
image is decoded, and val is carved from train where a layout has none; the texts are
cleaned and split 70/15/15. prepare_data.py pairs, tokenizes and writes what this module
reads.

Image trees are `split/class/*.png` (the balanced RAF-DB set and FER2013 on Kaggle; the
class folder names may be in any case and use aliases) or plain RAF-DB's
`DATASET/{train,test}/{1..7}`. Text files are `text,label` CSVs (with or without a leading
index column), dair-ai `text;label` lines, MELD's CSVs (columns `Utterance` and `Emotion`) or
GoEmotions' Ekman TSV (`text<TAB>label ids<TAB>comment id`, the ids in the order of the
`labels.txt` beside it). Labels are names (TEXT_TO_CLASS) or, where the file says nothing else,
the Emotions corpus's ids 0..5. Each line is UTF-8 or cp1252 (which spreadsheets export).
Everything under __MACOSX/ (macOS zips put a `._name` shadow of every file there) and every
dot-file (`._name`, `.DS_Store`, `.ipynb_checkpoints/`) is skipped: they are never data.
"""
import contextlib
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from data import CLASSES, SPLITS
from images import read_image
from prep import synthetic
from runtime import DataError, atomic_dir

# The face data sets on Kaggle (prepare_data.py --faces): RAF-DB as the reference used it
# (train/val/test of 75x75 PNGs), and FER2013 (train/test of 48x48 PNGs, no val). Both are
# split/class/*.png trees with lower-case class folders.
FACE_SETS = {"rafdb": "dollyprajapati182/balanced-raf-db-dataset-7575-grayscale",
             "fer2013": "msambare/fer2013"}
KAGGLE_TEXTS = "bhavikjikadara/emotions-dataset"
CREDENTIALS_HELP = ("no Kaggle credentials: put kaggle.json in ~/.kaggle/kaggle.json, or set "
                    "KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN (Kaggle -> Settings -> API); "
                    "or use --image-dir/--text-csv, or --source synthetic")
FOLDER_NAMES = {"angry": "Angry", "anger": "Angry", "disgust": "Disgust", "fear": "Fear",
                "happy": "Happy", "happiness": "Happy", "neutral": "Neutral", "sad": "Sad",
                "sadness": "Sad", "surprise": "Surprise", "surprised": "Surprise"}
RAFDB_IDS = {"1": "Surprise", "2": "Fear", "3": "Disgust", "4": "Happy", "5": "Sad",
             "6": "Angry", "7": "Neutral"}  # plain RAF-DB's numeric class folders
TEXT_LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # the Emotions corpus's ids 0..5
# Every label name a sentence file may use (any case), and the class of its faces. The Emotions
# corpus's names come first, in its order, so that its meta.json reads as it always has.
TEXT_TO_CLASS = {"sadness": "Sad", "joy": "Happy", "love": "Happy", "anger": "Angry",
                 "fear": "Fear", "surprise": "Surprise", "disgust": "Disgust", "neutral": "Neutral",
                 "sad": "Sad", "happy": "Happy", "happiness": "Happy", "angry": "Angry"}
# The header columns (text, label) of the CSVs, and how each reads a numeric label: the
# Emotions corpus's ids, or (MELD, whose Emotion column holds names) not at all.
CSV_COLUMNS = {("text", "label"): TEXT_LABELS, ("utterance", "emotion"): None}


def say(message):
    print(message, flush=True)


def digest(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def kaggle_api():
    """The official client, authenticated. It is imported here, not at the top, because
    `import kaggle` authenticates at import time and prints its own help when that fails."""
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            import kaggle
            kaggle.api.authenticate()
    except (Exception, SystemExit):
        raise DataError(CREDENTIALS_HELP) from None
    return kaggle.api


def kaggle_download(slug, raw_dir):
    """Download and unzip one data set into raw_dir/<name>/, once. The package deletes its
    zip after unzipping, so our own marker says the download finished."""
    dest = Path(raw_dir) / slug.split("/")[1]
    marker = dest / ".download-complete"
    if marker.exists():
        say(f"      {slug}: downloaded already ({dest})")
        return dest
    api = kaggle_api()
    say(f"      downloading {slug} ...")
    with atomic_dir(dest) as tmp:
        try:
            api.dataset_download_files(slug, path=str(tmp), unzip=True, quiet=False)
        except Exception as err:
            raise DataError(f"download of {slug} failed ({type(err).__name__}: {err}); "
                            "check the network and your Kaggle credentials") from None
        (tmp / marker.name).write_text(slug + "\n")
    return dest


def synthetic_raw(raw_dir, seed, images_per_class, texts, copies):
    """Generate the synthetic raw layout once for each seed, size and fraction of planted copies."""
    # the generator's own source is part of the key, so a changed generator draws the data again
    key = digest("synthetic", seed, images_per_class, texts, copies,
                 hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest())
    dest = Path(raw_dir) / "synthetic"
    marker = dest / ".generated"
    if marker.exists() and marker.read_text() == key:
        say(f"      synthetic raw data generated already ({dest})")
    else:
        say(f"      generating {sum(images_per_class) * 7} faces and {texts} sentences ...")
        with atomic_dir(dest) as tmp:
            synthetic.generate(tmp, seed=seed, images_per_class=images_per_class, texts=texts,
                               copies=copies)
            (tmp / marker.name).write_text(key)
    return dest / "images", dest / "texts.csv"


def is_data(path, root):
    """False for what archives and tools leave beside the data: __MACOSX/ and dot-files."""
    return not any(part == "__MACOSX" or part.startswith(".")
                   for part in Path(path).relative_to(root).parts)


def find_text_file(folder):
    """The first .csv in a downloaded folder, never a macOS shadow (`__MACOSX/._emotions.csv`)."""
    found = sorted(p for p in Path(folder).rglob("*.csv") if is_data(p, folder))
    if not found:
        raise DataError(f"no .csv file in {folder}")
    return found[0]


def find_image_root(image_dir):
    """The folder that holds the split folders. Downloads often nest it one or two folders
    deep; a zip's __MACOSX/ copy of the tree is skipped."""
    for depth in range(4):
        for folder in sorted([Path(image_dir)] if depth == 0 else
                             (p for p in Path(image_dir).glob("*/" * depth) if is_data(p, image_dir))):
            names = {p.name.lower() for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
            if {"train", "test"} <= names:
                return folder
    raise DataError(f"no train/ and test/ folders found in {image_dir}: expected "
                    "split/class/*.png (train, val, test) or RAF-DB's DATASET/{train,test}/{1..7}")


def class_of(folder):
    name = folder.lower()
    if name in FOLDER_NAMES or name in RAFDB_IDS:
        return FOLDER_NAMES.get(name) or RAFDB_IDS[name]
    known = ", ".join(sorted(FOLDER_NAMES)) + "; RAF-DB ids " + ", ".join(
        f"{k}={v}" for k, v in RAFDB_IDS.items())
    raise DataError(f"unknown class folder {folder!r}: known names (any case) are {known}")


def list_images(root):
    """{split: [(path, class), ...]} sorted, for the splits found (val may be missing)."""
    listing = {}
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        split = split_dir.name.lower()
        if split not in SPLITS:
            continue
        listing[split] = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and is_data(p, root)):
            # an unknown folder is an error even when empty
            name = class_of(class_dir.name)
            listing[split] += [(path, name) for path in sorted(class_dir.iterdir())
                               if path.is_file() and is_data(path, root)]
    return listing


def decode_text(path):
    """(text, {"utf-8": lines, "cp1252": lines}): each line read as UTF-8 (a BOM allowed at the
    start) when it decodes so, else as cp1252, which spreadsheets save and which also reads
    Latin-1. Line by line: one pasted cp1252 line must not send the whole file through
    cp1252, which turns every emoji and accent of the UTF-8 lines into mojibake ('cafÃ©').
    A line that decodes as neither is an error that names the bad byte."""
    raw = Path(path).read_bytes()
    # keepends: the lines join back to the file's own bytes. Neither encoding has a byte
    # 0x0a or 0x0d inside a character, so no character is cut in two.
    lines = raw.splitlines(keepends=True)
    counts = {"utf-8": 0, "cp1252": 0}
    decoded = []
    offset = 0
    for number, line in enumerate(lines, 1):
        try:
            decoded.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
            counts["utf-8"] += 1
        except UnicodeDecodeError as utf8_error:
            decoded.append(decode_cp1252(path, line, number, offset, utf8_error))
            counts["cp1252"] += 1
        offset += len(line)
    return "".join(decoded), counts


def decode_cp1252(path, line, number, offset, utf8_error):
    """One line that is not UTF-8, read as cp1252; an error naming the byte where it is neither."""
    try:
        return line.decode("cp1252")
    except UnicodeDecodeError as err:
        utf8_at = offset + utf8_error.start
        cp1252_at = offset + err.start
        raise DataError(f"{path} line {number} is neither UTF-8 (byte "
                        f"0x{line[utf8_error.start]:02x} at offset {utf8_at}) nor cp1252 (byte "
                        f"0x{line[err.start]:02x} at offset {cp1252_at}): save it as UTF-8") from None


def describe_encoding(counts):
    """'utf-8', or how many lines of each encoding a mixed file held."""
    if not counts["cp1252"]:
        return "utf-8"
    return ", ".join(f"{name} {n} line{'s' * (n != 1)}" for name, n in counts.items() if n)


def label_name(label, ids, where):
    """The label's name in TEXT_TO_CLASS: a name in any case, or an id read through `ids`;
    anything else is one error naming `where` (the file and line)."""
    name = label.strip().lower()
    if ids and name.isdigit() and int(name) < len(ids):
        name = ids[int(name)]
    if name not in TEXT_TO_CLASS:
        known = ", ".join(f"{n} -> {c}" for n, c in TEXT_TO_CLASS.items())
        if ids:
            known += "; ids " + ", ".join(f"{i} {n} -> {TEXT_TO_CLASS[n]}" for i, n in enumerate(ids))
        raise DataError(f"{where}: unmapped label {name!r}; known labels (any case): {known}")
    return name


def csv_rows(path, f):
    """(rows, ids) of a CSV with a header: `text,label` (an index column beside them is ignored)
    or MELD's `Utterance` and `Emotion` among its other columns. Each row is (line, text, label)."""
    reader = csv.DictReader(f)
    columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
    for (text, label), ids in CSV_COLUMNS.items():
        if text in columns and label in columns:
            break
    else:
        raise DataError(f"{path} has columns {reader.fieldnames}: expected 'text' and 'label', or MELD's "
                        "'Utterance' and 'Emotion' (or dair-ai 'text;label' lines, or a GoEmotions .tsv)")
    # line_num is read after each row: the line where that row ends
    return [(reader.line_num, r[columns[text]] or "", r[columns[label]] or "") for r in reader], ids


def goemotions_rows(path, f):
    """(rows, ids) of GoEmotions' TSV, whose ids are the lines of the labels.txt beside it. A row
    with several ids is dropped, since its class is ambiguous; the number dropped is printed."""
    names_file = Path(path).with_name("labels.txt")
    if not names_file.exists():
        raise DataError(f"{path} is a GoEmotions TSV, whose label ids are the lines of the labels.txt "
                        f"beside it, but {names_file} does not exist")
    ids = [label_name(name, None, f"{names_file} line {number}")
           for number, name in enumerate(names_file.read_text(encoding="utf-8-sig").splitlines(), 1)
           if name.strip()]
    # QUOTE_NONE: GoEmotions does not quote, and a sentence may start with a quotation mark
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = [(number, *row[:2]) for number, row in enumerate(reader, 1) if len(row) >= 2]
    single = [row for row in rows if "," not in row[2]]
    several = len(rows) - len(single)
    if several:
        say(f"      {Path(path).name}: dropped {several:,} row{'s' * (several != 1)} with several labels")
    return single, ids


def read_texts(path):
    """(texts, label names, lines per encoding) from any of the text files of the module's
    docstring. An empty row is kept here (split_texts counts it as dropped), its label unread."""
    content, encoding = decode_text(path)
    # newline="": the csv module sees line ends as stored
    with io.StringIO(content, newline="") as f:
        first = f.readline()
        f.seek(0)
        if Path(path).suffix.lower() == ".tsv":
            rows, ids = goemotions_rows(path, f)
        # dair-ai: text;label, no header
        elif ";" in first and "," not in first.split(";")[-1]:
            rows = [(number, *line.rstrip("\r\n").rsplit(";", 1)) for number, line in enumerate(f, 1)
                    if line.strip()]
            rows, ids = [r for r in rows if len(r) == 3], TEXT_LABELS
        else:
            rows, ids = csv_rows(path, f)
    texts = [text for _, text, _ in rows]
    labels = [label_name(label, ids, f"{path} line {number}") if text.strip() else label
              for number, text, label in rows]
    return texts, labels, encoding


# ---- the raw data into splits ------------------------------------------------------
def stratified_split(rows, labels, fraction, seed, what):
    """(rest, part): `fraction` of `rows` in part, every class in proportion, seeded."""
    try:
        return train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as err:  # e.g. a label with a single example
        raise DataError(f"cannot split the {what} stratified by class ({err}); "
                        "provide more examples of each class") from None


def take(split, rows):
    """The images, labels and file names of one split at `rows`."""
    return {"images": split["images"][rows], "labels": split["labels"][rows],
            "files": [split["files"][i] for i in rows]}


def read_images(listing, root, size, seed):
    """Decode every file; unreadable files are skipped and named. Without a val split, 15 % of
    train becomes val, stratified and seeded (plain RAF-DB and FER2013 have only train and
    test). Each image keeps its file name (relative to `root`) for the leak audit."""
    result = {}
    skipped = []
    for split, files in listing.items():
        images = []
        labels = []
        names = []
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
        result["val"] = take(train, np.sort(val))
        result["train"] = take(train, np.sort(keep))
    for split in SPLITS:
        if len(result[split]["labels"]) == 0:
            raise DataError(f"no readable images in the {split} split of the image folder")
    result["skipped"] = skipped
    return result


def split_texts(path, seed):
    """Normalize the whitespace, drop empty rows and exact duplicates (before splitting, so that
    no sentence is in two splits), then split 70/15/15, stratified by label."""
    texts, labels, encoding = read_texts(path)
    seen = set()
    clean = []
    clean_labels = []
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
    result["dropped"] = len(texts) - len(clean)
    result["encoding"] = encoding
    return result

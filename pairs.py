"""Files of pairs: a user's CSV of pairs or folder of photos in, and the predictions CSV that
demo.py --pairs / --images appends to and resumes from.

    pairs = read_pairs("pairs.csv")                    # columns image,text: [Pair], photo paths
    pairs = read_pairs("mine.csv", columns=LABELLED)   # image,text,label: evaluate.py --pairs
    pairs = folder_pairs("photos/", text=None)         # every photo in a folder, by name
    with PredictionsFile("predictions.csv", classes, pairs, recognizer.fingerprint()) as out:
        for pair in out.todo:                          # the pairs without an answer in it yet
            out.append(pair, prediction)               # one row per face, flushed at once

A cell may be empty (no image, or no text); a photo's path is relative to the CSV. A file
that cannot be read as such a CSV (a missing column, bytes that are not UTF-8) is one
DataError naming the line.

The predictions CSV holds the answers to one set of pairs. Each row carries a key, a digest of
what its answer depends on: the pair's line, its photo's path and bytes, its sentence, and the
checkpoints. A run keeps the rows whose key is one of its pairs', drops the others (an answer to
a photo, sentence or checkpoint since changed, or to other inputs) and appends the rest, a pair's
rows in one write. A stopped run can leave the file cut anywhere, even inside a quoted sentence
or a character: the next run cuts it back to its last whole row, drops the pair that row belongs to
if its rows are not all there, and predicts that pair again. What is in a pair is the
recognizer's to read (recognizer.py).
"""
import codecs
import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from runtime import DataError, atomic_write

PAIRED = ("image", "text")
LABELLED = ("image", "text", "label")


# eq=False: two rows alike are still two pairs, and a pair can key a dict
@dataclass(eq=False)
class Pair:
    """One row of a pairs CSV, or one photo of a folder."""
    line: int | None    # the CSV line it starts on; None for a folder's photo
    image: str          # as written in the CSV (or the file name in the folder); "" = none
    path: Path | None   # the photo to read; None = no image
    text: str | None    # None = no sentence
    label: str | None = None


def decoded(path, cut=False):
    """The text of a UTF-8 file (a byte-order mark allowed), or a DataError naming the line.
    cut: the file may end inside a character (a run stopped while writing it), which is dropped."""
    try:
        data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=not cut)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 (byte {data[err.start]:#04x}): "
                        "save the file as UTF-8") from None


def read_pairs(path, columns=PAIRED):
    """A CSV with (at least) `columns` -> [Pair]; blank lines are skipped."""
    reader = csv.reader(io.StringIO(decoded(path)))
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [name for name in columns if name not in header]
    if missing:
        raise DataError(f"{path}: line 1 (the header) has no {', '.join(missing)} column: the columns are "
                        f"{','.join(columns)} (image and text may be empty in a row, not both)")
    folder = Path(path).parent
    pairs = []
    while True:
        line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num}: not a CSV row ({err})") from None
        if not any(value.strip() for value in values):
            continue
        row = dict(zip(header, values))
        image = row.get("image", "").strip()
        text = row.get("text", "")
        pairs.append(Pair(line, image, folder / image if image else None, text if text.strip() else None,
                          row.get("label", "").strip() or None))
    return pairs


def folder_pairs(folder, text=None):
    """Every photo in `folder` (not its subfolders), by name, each with the shared `text`."""
    from PIL import Image
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    extensions = set(Image.registered_extensions())
    # "._x.jpg": macOS's resource-fork shadow of x.jpg, not a photo
    photos = sorted(p for p in folder.iterdir()
                    if p.suffix.lower() in extensions and p.is_file() and not p.name.startswith("."))
    if not photos:
        raise DataError(f"{folder} holds no photos (files Pillow opens: .jpg, .png, .webp, ...)")
    return [Pair(None, photo.name, photo, text) for photo in photos]


def answer_key(pair, fingerprint):
    """What the answer to a pair depends on, as 16 hex digits: its line (the row names it), its
    photo's path as written and a digest of the photo's bytes, its sentence, and the model's
    `fingerprint` (EmotionRecognizer.fingerprint: the checkpoints, face detection on or off)."""
    photo = ""
    if pair.path is not None:
        try:
            with open(pair.path, "rb") as f:
                photo = hashlib.file_digest(f, "sha256").hexdigest()
        # its row is an error; once the photo can be read, the key changes and it is predicted
        except OSError:
            pass
    return hashlib.sha256(json.dumps([pair.line, pair.image, photo, pair.text, fingerprint]).encode()).hexdigest()[:16]


def whole_rows(text):
    """A CSV text that a stopped run may have cut anywhere -> (its whole rows as the csv parser
    reads them, the text up to their end). A row is whole where it ends at a line end the parser
    reads outside quotes: a cut after a newline inside a quoted sentence is no row's end."""
    read = 0
    ended = False

    def lines():
        nonlocal read, ended
        # StringIO ends a line at "\n" alone, as csv.reader wants: not at "\r" or "\u2028"
        for line in io.StringIO(text):
            read += len(line)
            yield line
        ended = True

    rows, end = [], 0
    for row in csv.reader(lines()):
        # the text ran out inside the row (an open quote), or the row's last line has no end
        if ended or text[read - 1] != "\n":
            break
        rows.append(row)
        end = read
    return rows, text[:end]


def prediction_columns(classes):
    """The predictions CSV's header: one row per face; the last column is the answer's key."""
    return ["line", "image", "text", "face", "faces", "box_x", "box_y", "box_w", "box_h", "label",
            *classes, "inputs", "truncated", "error", "warning", "key"]


def prediction_rows(pair, key, outcome, classes):
    """A Pair, its answer_key and its recognizer Prediction (or the DataError that stopped it) ->
    CSV rows: one per face, one for the centre square or blank face when none was found, one for
    an error."""
    common = {"line": "" if pair.line is None else pair.line, "image": pair.image, "text": pair.text or "",
              "key": key}

    def named(message):
        # the photo named as the image column names it: a kept row reads as a new one would, wherever
        # the inputs lie now
        return message if pair.path is None else message.replace(str(pair.path), pair.image)

    if isinstance(outcome, Exception):
        return [{**common, "faces": 0, "error": named(str(outcome))}]
    faces = outcome.faces or [None]
    rows = []
    for number, face in enumerate(faces, 1):
        box = face.box if face else ["", "", "", ""]
        answer = face or outcome
        rows.append({**common, "face": number if face else "", "faces": len(outcome.faces),
                     **dict(zip(("box_x", "box_y", "box_w", "box_h"), box)), "label": answer.label,
                     **{name: round(answer.probabilities[name], 6) for name in classes},
                     "inputs": "+".join(outcome.inputs), "truncated": outcome.truncated,
                     "warning": named("; ".join(outcome.warnings))})
    return rows


def whole_answer(rows):
    """Are these rows of one pair all there? One per face, or one when none was found."""
    faces = rows[0]["faces"]
    return faces.isdigit() and len(rows) == max(int(faces), 1)


def cannot_write(path, err):
    """An OSError writing `path` (a full disk, say) -> the DataError to show."""
    return DataError(f"cannot write {path}: {err.strerror or err}")


class PredictionsFile:
    """The predictions CSV of `pairs`, opened to append: `todo` holds the pairs without a whole
    answer in it, and `dropped` counts the answers it held to no pair of these as they are now
    (a changed photo, sentence or checkpoint, or other inputs). Those, and the rows of a pair
    cut short by a stopped run, leave the file (rewritten atomically without them)."""

    def __init__(self, path, classes, pairs, fingerprint):
        self.path = Path(path)
        self.columns = prediction_columns(classes)
        self.classes = classes
        self.keys = {pair: answer_key(pair, fingerprint) for pair in pairs}
        self.todo = list(pairs)
        self.dropped = 0
        self.file = None

    def __enter__(self):
        try:
            text = decoded(self.path, cut=True) if self.path.exists() else ""
            # no file, an empty one, or one whose header a stopped run cut short: begin it
            if self._table([]).startswith(text):
                self._rewrite([])
            else:
                self._resume(text)
            self.file = open(self.path, "a", newline="", encoding="utf-8")
        except OSError as err:
            raise cannot_write(self.path, err) from None
        return self

    def __exit__(self, *exc):
        # after a failed write, closing tries the rows still buffered once more; fsync, so that a
        # power cut loses no row that the run reported as written
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as err:
            raise cannot_write(self.path, err) from None

    def _table(self, rows, header=True):
        """Rows (dicts) -> their CSV text, after the header where `header`."""
        out = io.StringIO()
        # "\r\n", the csv module's own line end: with it, a sentence holding a lone "\r" is quoted too
        writer = csv.DictWriter(out, self.columns, restval="", lineterminator="\r\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def _rewrite(self, rows):
        """The file made of the header and `rows`, whole or not at all."""
        with atomic_write(self.path) as tmp:
            tmp.write_text(self._table(rows), encoding="utf-8", newline="")

    def _resume(self, text):
        """The text a run before wrote -> the whole answers to these pairs kept, the rest dropped."""
        try:
            rows, whole = whole_rows(text)
        except csv.Error as err:
            raise DataError(f"{self.path} is not a predictions file ({err}): pass another --out") from None
        if not rows or rows[0] != self.columns:
            raise DataError(f"{self.path} is not a predictions file that this version writes for this "
                            "checkpoint's classes (its header differs): pass another --out")
        answers = {}
        for values in rows[1:]:
            # a row of another length is no answer of this file's (None is no pair's key)
            key = values[-1] if len(values) == len(self.columns) else None
            answers.setdefault(key, []).append(dict(zip(self.columns, values)))
        wanted = set(self.keys.values())
        done = {key for key, answer in answers.items() if key in wanted and whole_answer(answer)}
        self.dropped = len(answers.keys() - wanted)
        self.todo = [pair for pair in self.todo if self.keys[pair] not in done]
        kept = [row for key, answer in answers.items() if key in done for row in answer]
        # the file's bytes, not the text's characters: a character cut short was dropped from the text
        if len(kept) < len(rows) - 1 or len(whole.encode("utf-8")) < self.path.stat().st_size:
            self._rewrite(kept)

    def append(self, pair, outcome):
        """The rows of one pair, written in one go and flushed: an interrupted run keeps them."""
        try:
            self.file.write(self._table(prediction_rows(pair, self.keys[pair], outcome, self.classes), header=False))
            self.file.flush()
        except OSError as err:
            raise cannot_write(self.path, err) from None

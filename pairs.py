"""Files of pairs: a user's CSV of pairs or folder of photos in, and the predictions CSV that
demo.py --pairs / --images appends to and resumes from.

    pairs = read_pairs("pairs.csv")                    # columns image,text: [Pair], photo paths
    pairs = read_pairs("mine.csv", columns=LABELLED)   # image,text,label: evaluate.py --pairs
    pairs = folder_pairs("photos/", text=None)         # every photo in a folder, by name
    with PredictionsFile("predictions.csv", classes) as out:
        todo = [pair for pair in pairs if pair.key not in out.done]
        out.append(pair, prediction)                   # one row a face, flushed at once

A cell may be empty (no image, or no text); a photo's path is relative to the CSV. A file
that cannot be read as such a CSV (a missing column, bytes that are not UTF-8) is one
DataError naming the line. The predictions CSV is only ever appended to, a pair's rows in
one write; when a stopped run left a pair half-written, the next run drops that pair's rows
and predicts it again. What is in a pair is the recognizer's to read (recognizer.py).
"""
import csv
import io
from dataclasses import dataclass
from pathlib import Path

from runtime import DataError, atomic_write

PAIRED = ("image", "text")
LABELLED = ("image", "text", "label")


@dataclass
class Pair:
    """One row of a pairs CSV, or one photo of a folder."""
    line: int | None    # the CSV line it starts on; None for a folder's photo
    image: str          # as written in the CSV (or the file name in the folder); "" = none
    path: Path | None   # the photo to read; None = no image
    text: str | None    # None = no sentence
    label: str | None = None

    @property
    def key(self):
        """What names the pair in the predictions CSV: its line and its image."""
        return ("" if self.line is None else str(self.line), self.image)


def decoded(path):
    """The text of a UTF-8 file (a byte-order mark allowed), or a DataError naming the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
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


def prediction_columns(classes):
    """The predictions CSV's header: one row a face."""
    return ["line", "image", "text", "face", "faces", "box_x", "box_y", "box_w", "box_h", "label",
            *classes, "inputs", "truncated", "error", "warning"]


def prediction_rows(pair, outcome, classes):
    """A Pair and its recognizer Prediction (or the DataError that stopped it) -> CSV rows:
    one a face, one for the centre square or blank face when none was found, one for an error."""
    line, image = pair.key
    common = {"line": line, "image": image, "text": pair.text or ""}
    if isinstance(outcome, Exception):
        return [{**common, "faces": 0, "error": str(outcome)}]
    faces = outcome.faces or [None]
    rows = []
    for number, face in enumerate(faces, 1):
        box = face.box if face else ["", "", "", ""]
        answer = face or outcome
        rows.append({**common, "face": number if face else "", "faces": len(outcome.faces),
                     **dict(zip(("box_x", "box_y", "box_w", "box_h"), box)), "label": answer.label,
                     **{name: round(answer.probabilities[name], 6) for name in classes},
                     "inputs": "+".join(outcome.inputs), "truncated": outcome.truncated,
                     "warning": "; ".join(outcome.warnings)})
    return rows


class PredictionsFile:
    """The predictions CSV, opened to append: `done` holds the keys of the pairs already in
    it, whole. Rows of a pair cut short by a stopped run are dropped (the file rewritten
    atomically without them), so that the pair is predicted again, not kept in part."""

    def __init__(self, path, classes):
        self.path = Path(path)
        self.columns = prediction_columns(classes)
        self.classes = classes
        self.done = set()
        self.file = None

    def __enter__(self):
        kept = self._complete_rows() if self.path.exists() and self.path.stat().st_size else None
        try:
            self.file = open(self.path, "a", newline="", encoding="utf-8")
        except OSError as err:
            raise DataError(f"cannot write {self.path}: {err.strerror or err}") from None
        self.writer = csv.DictWriter(self.file, self.columns, restval="", lineterminator="\n")
        if kept is None:
            self.writer.writeheader()
            self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()

    def _complete_rows(self):
        """Read what a run before wrote; -> its rows, with those of any half-written pair gone."""
        text = decoded(self.path)
        # a line cut short by a killed run (a pair's rows go in one write, the last may not end)
        whole = text[:text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(whole))
        if reader.fieldnames != self.columns:
            raise DataError(f"{self.path} is not a predictions file of this checkpoint's classes "
                            "(its header differs): pass another --out")
        groups = {}
        for row in reader:
            groups.setdefault((row["line"], row["image"]), []).append(row)
        kept = []
        for key, rows in groups.items():
            # a pair's row count: one a face, or one when none was found
            if len(rows) == max(int(rows[0]["faces"] or 0), 1):
                self.done.add(key)
                kept += rows
        if whole != text or len(kept) < sum(len(rows) for rows in groups.values()):
            out = io.StringIO()
            writer = csv.DictWriter(out, self.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            with atomic_write(self.path) as tmp:
                tmp.write_text(out.getvalue(), encoding="utf-8")
        return kept

    def append(self, pair, outcome):
        """The rows of one pair, written in one go and flushed: an interrupted run keeps them."""
        out = io.StringIO()
        csv.DictWriter(out, self.columns, restval="", lineterminator="\n").writerows(
            prediction_rows(pair, outcome, self.classes))
        self.file.write(out.getvalue())
        self.file.flush()
        self.done.add(pair.key)

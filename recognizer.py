"""The Python API: load a checkpoint (or several: an ensemble) once, then predict the emotion
of a face photo, a sentence or both, one pair at a time or many batched through the model.

    from recognizer import EmotionRecognizer
    recognizer = EmotionRecognizer.load("checkpoints/model_b/best.pt", device="auto")
    result = recognizer.predict(image="face.jpg", text="what a day")   # either input alone is fine
    result.label, result.probabilities, result.faces
    results = recognizer.predict_many([("a.jpg", "so happy"), ("b.png", None)], batch_size=64)
    for frame in recognizer.predict_video("talk.mp4", subtitles="talk.srt", fps=5):  # or a camera: 0
        frame.time, frame.index, frame.text, frame.faces   # faces with .id, .box, .label, .probabilities

`image` is a path, a PIL image or a numpy uint8 array, gray (H, W) or RGB (H, W, 3). Every
face found gets its own result, largest first; the answer is the largest face's, or the
centre square's when no face is found. A missing input is replaced by the evaluation's blank
(a gray face or an empty sentence). Probabilities are calibrated with each checkpoint's
temperature, and an ensemble averages its members' calibrated probabilities. The model runs
in fp32 whatever the batch size, so predict_many gives what single predict calls give, up to
float rounding. Without a path, load() takes the best run under checkpoints/ on the data set
trained last (default_checkpoint).

The end of this file holds batch mode's files: the pairs read from a CSV or a folder, and the
predictions CSV that demo.py --pairs and --images append to and resume from. demo.py and
evaluate.py --pairs are command lines over this module.
"""
import codecs
import csv
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models import CheckpointError, load_checkpoint
from data import BLANK_PIXEL, encode_counted
from images import FaceTracker, Video, as_photo, face_crops, line_at, open_video, read_subtitles, to_gray, video_frames
from runtime import DataError, atomic_write, one_line, pick_device, read_log

# how the notes, the default-checkpoint line and the explain figure name each --modality
MODALITY_NAMES = {"both": "fused", "image": "image-only", "text": "text-only"}
# what a model reads in place of a missing input (the evaluation's ablation blanks)
BLANKS = {"image": "a blank gray face", "text": "an empty sentence"}
# predict_many sorts this many batches of pairs by sentence length at a time, so that each
# batch is trimmed to a length close to that of its own sentences: Model B's Transformer, which
# takes 2/3 of its CPU time, reads padding as it reads words
SORTED_BATCHES = 4


@torch.inference_mode()
def predict(model, images, input_ids, lengths, device, *, temperature):
    """uint8 images [N,S,S] + token ids [N,L] (0 = pad) -> calibrated probabilities [N,C]."""
    width = max(int(lengths.max()), 1)
    model.eval()
    logits = model(input_ids[:, :width].long().to(device), lengths.long(), images=images.to(device))
    return (logits.float() / temperature).softmax(1).cpu()


def default_checkpoint(root="checkpoints"):
    """-> (best.pt of the best run, why). Val macro-F1 compares runs on one data set only (a
    synthetic quick start scores far higher than a real run): the data set trained on last (the
    newest log.csv) is the one chosen from. Among its runs, a fused run first, then the best val
    macro-F1, then Model B."""
    runs = []
    for best in Path(root).glob("*/best.pt"):
        args_file = best.with_name("args.json")
        log_file = best.with_name("log.csv")
        if not (args_file.exists() and log_file.exists()):
            continue
        run_args = json.loads(args_file.read_text())
        f1 = max((float(row["val_macro_f1"]) for row in read_log(log_file)), default=-1.0)
        modality = run_args.get("modality", "both")
        # the prepared data's key (meta.json's); an older run names its data by the folder alone
        data = run_args.get("data_key") or run_args.get("data")
        runs.append({"rank": (modality == "both", f1, run_args.get("model") == "b"), "path": str(best),
                     "modality": modality, "data": data, "trained": log_file.stat().st_mtime_ns})
    if not runs:
        raise DataError(f"no checkpoint found under {root}/*/best.pt: train one "
                        "(`python train.py --model b`) or pass --checkpoint")
    data = max(runs, key=lambda run: run["trained"])["data"]
    compared = [run for run in runs if run["data"] == data]
    chosen = max(compared, key=lambda run: run["rank"])
    fused, f1, is_b = chosen["rank"]
    why = (f"Model {'B' if is_b else 'A'}, {MODALITY_NAMES.get(chosen['modality'], chosen['modality'])}, "
           f"val macro-F1 {f1:.3f}: {'the best of' if fused else 'no fused run among'} {len(compared)} run(s) "
           f"on the data set trained last under {root}/")
    if len(compared) < len(runs):
        why += f"; {len(runs) - len(compared)} run(s) on other data not compared"
    return chosen["path"], why


def load_members(paths, device="cpu"):
    """Checkpoints to average -> [(model, tokenizer, info)]. Members must read their inputs
    alike: one tokenizer (the same ids mean the same words), one class list, one face size and
    one sentence length, else a CheckpointError naming the first that differs."""
    if not paths:
        raise DataError("no checkpoint given: pass one path, or several for an ensemble")
    members = [load_checkpoint(path, device) for path in paths]
    _, first_tokenizer, first = members[0]
    for path, (_, tokenizer, info) in zip(paths[1:], members[1:]):
        differs = [("tokenizer", tokenizer.get_vocab() != first_tokenizer.get_vocab(), "another vocabulary"),
                   ("class list", info["classes"] != first["classes"], info["classes"]),
                   ("face size", info["image_size"] != first["image_size"], f"{info['image_size']} px"),
                   ("sentence length", info["config"]["max_len"] != first["config"]["max_len"],
                    f"{info['config']['max_len']} tokens")]
        for what, differ, theirs in differs:
            if differ:
                raise CheckpointError(f"{path} cannot join an ensemble with {paths[0]}: its {what} differs "
                                      f"({theirs}); an ensemble averages checkpoints trained on one data set")
    return members


@dataclass
class PreparedPair:
    """What the model reads of one pair: the photo and its faces, the sentence and its ids."""
    photo: np.ndarray | None  # uint8 (H, W[, 3]); None: no image read
    boxes: list               # face boxes (x, y, w, h), largest first
    squares: list             # each face's crop (x, y, side); the centre square if none
    crops: torch.Tensor       # uint8 (N, S, S), N >= 1
    text: str                 # "": no sentence read
    input_ids: torch.Tensor   # int32 (1, max_len), 0 = pad
    lengths: torch.Tensor     # int16 (1,)
    truncated: bool           # cut at max_len tokens
    used: list                # ["image"], ["text"] or both
    warnings: list            # no face found, the sentence cut


@dataclass
class Face:
    """One face found in the photo, and what the model says of it."""
    box: list            # [x, y, w, h] as the detector found it
    crop: list           # [x, y, side, side]: the square the model read
    label: str
    probabilities: dict  # class -> calibrated probability


@dataclass
class Prediction:
    """The answer for one pair: the largest face's (or the centre square's, or the blank face's)."""
    label: str
    probabilities: dict  # class -> calibrated probability
    faces: list          # [Face], every face found, largest first; [] if none or no image
    inputs: list         # what was read: ["image", "text"], ["image"] or ["text"]
    truncated: bool      # the sentence was longer than the model reads
    warnings: list       # lines worth a look: no face found, the sentence cut
    # what the model read (predict only: a batch of 12 MP photos would fill the memory)
    prepared: PreparedPair | None = field(default=None, repr=False, compare=False)

    @property
    def face(self):
        """The largest face's box and crop, or None."""
        return {"box": self.faces[0].box, "crop": self.faces[0].crop} if self.faces else None

    def to_dict(self):
        """What demo.py --json prints."""
        return {"label": self.label, "probabilities": self.probabilities, "face": self.face,
                "faces": [asdict(face) for face in self.faces], "inputs": self.inputs,
                "truncated": self.truncated}


@dataclass
class VideoFace(Face):
    """One face in a video frame: a Face and the id it keeps from frame to frame."""
    id: int


@dataclass
class VideoFrame:
    """One sampled frame of a video and what the model says of each face in it."""
    time: float   # seconds from the start (a camera: from its first frame)
    index: int    # the frame's index in the video
    text: str | None  # the subtitle line shown at `time`, or None
    faces: list   # [VideoFace], largest first; [] where no face was found
    error: str = ""   # why this frame has no answer (an odd frame ends no video)


def pair_parts(pair):
    """(image, text) or {"image": ..., "text": ...} -> (image, text); either may be None."""
    if isinstance(pair, dict):
        return pair.get("image"), pair.get("text")
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        return pair[0], pair[1]
    raise DataError(f"a pair is (image, text) or {{'image': ..., 'text': ...}}, not {type(pair).__name__} {pair!r:.60}")


class EmotionRecognizer:
    """One checkpoint, or an ensemble of several, loaded once: predict() and predict_many()."""

    def __init__(self, members, paths, device, detect=True):
        self.members = members  # [(model, tokenizer, info)] from load_members
        self.paths = [str(path) for path in paths]
        self.device = device
        self.detect = detect  # False: the centre square is the face
        model, self.tokenizer, info = members[0]
        self.classes = list(info["classes"])
        self.image_size = info["image_size"]
        self.max_len = model.cfg.max_len
        self.reads = {"image": any(m.uses_image for m, _, _ in members),
                      "text": any(m.uses_text for m, _, _ in members)}

    @classmethod
    def load(cls, path_or_paths=None, device="auto", *, detect=True, root="checkpoints"):
        """A path, several (an ensemble) or None (default_checkpoint under `root`); device
        "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
        if path_or_paths is None:
            paths = [default_checkpoint(root)[0]]
        elif isinstance(path_or_paths, (str, os.PathLike)):
            paths = [path_or_paths]
        else:
            paths = list(path_or_paths)
        device = pick_device(device) if isinstance(device, str) else torch.device(device)
        return cls(load_members(paths, device), paths, device, detect)

    def fingerprint(self):
        """What every answer depends on besides its pair, as 16 hex digits: the checkpoints'
        bytes as they were loaded, in any order (an ensemble's mean is the same), and whether
        faces are looked for."""
        members = sorted(info["sha256"] for _, _, info in self.members)
        return hashlib.sha256(json.dumps([members, self.detect]).encode()).hexdigest()[:16]

    def check_inputs(self, given):
        """Refuse a pair without the one input a single-modality member reads."""
        if not (given["image"] or given["text"]):
            raise DataError("a pair needs an image, a text or both")
        for model, _, _ in self.members:
            modality = model.cfg.modality
            if modality != "both" and not given[modality]:
                raise DataError(f"this checkpoint reads the {modality} alone (--modality {modality}): "
                                f"give --{modality} (in Python, {modality}=)")

    def input_notes(self, given):
        """The lines demo.py prints on stderr for `given` ({"image": bool, "text": bool}): an
        input given that no member reads, an input missing and its blank, and a warning with the
        val figure of a member that never saw a missing input in training."""
        notes = {}
        for model, _, info in self.members:
            modality = model.cfg.modality
            needed = {"image": model.uses_image, "text": model.uses_text}
            for name in ("image", "text"):
                if given[name] and not needed[name]:
                    notes[f"note: a {MODALITY_NAMES[modality]} checkpoint does not read --{name}"] = None
            missing = [name for name in ("image", "text") if needed[name] and not given[name]]
            if not missing or modality != "both":
                continue
            notes[f"note: no --{missing[0]}: the model reads {BLANKS[missing[0]]} in its place"] = None
            if (info["args"] or {}).get("modality_dropout"):
                continue
            ablation = (info["metrics"] or {}).get("val_ablation") or {}
            row = f"no {missing[0]}"
            figure = f"val accuracy with {row}: {ablation[row]:.2f}" if row in ablation else "no val ablation stored"
            figure += f", with both: {ablation['full']:.2f}" if row in ablation and "full" in ablation else ""
            notes[f"warning: this checkpoint was trained without --modality-dropout: its scores on one "
                  f"input are unreliable ({figure})"] = None
        return list(notes)

    def prepare(self, image=None, text=None):
        """One pair -> PreparedPair: the photo read, its faces found and cropped, the sentence
        encoded. Bad input (an unreadable image, an empty sentence) is a DataError."""
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise DataError(f"the text is {'empty' if isinstance(text, str) else type(text).__name__}: give "
                            "a sentence, or none to read the face alone")
        photo = None if image is None else as_photo(image)
        given = {"image": photo is not None, "text": text is not None}
        self.check_inputs(given)
        used = [name for name in ("image", "text") if given[name] and self.reads[name]]
        sentence = text if "text" in used else ""
        input_ids, lengths, counts = encode_counted(self.tokenizer, [sentence], self.max_len)
        if sentence and lengths[0] == 0:
            raise DataError("the text has no words the model can read (control characters alone): "
                            "give the sentence that goes with the face")
        warnings = []
        if counts[0] > self.max_len:
            warnings.append(f"the sentence has {counts[0]} tokens and the model reads the first "
                            f"{self.max_len}: the rest is cut")
        size = self.image_size
        # no image read: the blank face, taken whole
        gray = to_gray(photo) if "image" in used else np.full((size, size), BLANK_PIXEL, np.uint8)
        boxes, squares, crops = face_crops(gray, size, detect="image" in used and self.detect)
        if "image" in used and self.detect and not boxes:
            where = f" in {image}" if isinstance(image, (str, os.PathLike)) else ""
            warnings.append(f"no face found{where}: using its centre square (right for an image that is "
                            "already a face crop)")
        return PreparedPair(photo if "image" in used else None, boxes, squares, torch.from_numpy(crops),
                            sentence, input_ids, lengths, counts[0] > self.max_len, used, warnings)

    def probabilities(self, crops, input_ids, lengths):
        """uint8 crops [N,S,S], ids [N,L], lengths [N] -> the members' mean calibrated probabilities [N,C]."""
        probs = [predict(model, crops, input_ids, lengths, self.device, temperature=info["temperature"])
                 for model, _, info in self.members]
        return torch.stack(probs).mean(0)

    def result(self, prepared, probs, keep=False):
        """A PreparedPair and its faces' probabilities [N,C] -> Prediction (holding the
        PreparedPair where `keep`)."""
        classes = self.classes
        faces = [Face(list(box), [x, y, side, side], classes[int(p.argmax())], dict(zip(classes, p.tolist())))
                 for box, (x, y, side), p in zip(prepared.boxes, prepared.squares, probs)]
        return Prediction(classes[int(probs[0].argmax())], dict(zip(classes, probs[0].tolist())), faces,
                          prepared.used, prepared.truncated, prepared.warnings, prepared if keep else None)

    def predict(self, image=None, text=None):
        """One pair -> Prediction, with the PreparedPair it read (`.prepared`: demo.py --explain)."""
        return next(self.iter_predictions([(image, text)], keep_inputs=True))

    def predict_many(self, pairs, batch_size=64, *, errors="raise"):
        """Pairs, (image, text) or dicts -> [Prediction], in order, the faces of `batch_size`
        pairs at a time through the model. Any failure on one pair is a DataError naming it;
        errors="return": that DataError stands in the pair's place, and the others are predicted."""
        return list(self.iter_predictions(pairs, batch_size, errors=errors))

    def iter_predictions(self, pairs, batch_size=64, *, errors="raise", keep_inputs=False):
        """predict_many, yielding each pair's answer as its batch is done: a long run keeps
        what it has done when it is stopped."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        chunk = []
        for pair in pairs:
            chunk.append(pair)
            if len(chunk) == batch_size * SORTED_BATCHES:
                yield from self._predict_chunk(chunk, batch_size, errors, keep_inputs)
                chunk = []
        if chunk:
            yield from self._predict_chunk(chunk, batch_size, errors, keep_inputs)

    def predict_video(self, source, subtitles=None, fps=5, *, after=None, tracker=None, frames_per_batch=8):
        """A video file, a camera index or an open images.Video -> VideoFrame after VideoFrame, one
        every 1/fps seconds (after `after` seconds, for a resumed run), as they are read: a camera
        streams. `subtitles` (an SRT or WebVTT path, or [images.Line]) gives each frame the line
        shown at its time; a frame without a line is read from its faces alone. Each face keeps an
        id across frames (`tracker`, an images.FaceTracker). The faces of `frames_per_batch` frames
        go through the model together."""
        if not all(model.uses_image for model, _, _ in self.members):
            raise DataError("a video needs a checkpoint that reads faces: this one reads the text alone")
        video = source if isinstance(source, Video) else open_video(source, fps)
        lines = read_subtitles(subtitles) if isinstance(subtitles, (str, os.PathLike)) else subtitles or []
        tracker = tracker or FaceTracker()
        waiting = []
        for at, index, frame in video_frames(video, after):
            line = line_at(lines, at)
            try:
                boxes, squares, crops = face_crops(to_gray(frame), self.image_size)
                # a frame without a face has no answer: drop face_crops' centre square
                squares, crops = squares[:len(boxes)], crops[:len(boxes)]
            except Exception as err:
                yield VideoFrame(at, index, line and line.text, [], f"the frame could not be read ({one_line(err)})")
                continue
            waiting.append((VideoFrame(at, index, line and line.text, []), boxes, squares, crops,
                            tracker.ids(boxes)))
            # a camera's frames one at a time: its rows are wanted as they happen
            if len(waiting) == frames_per_batch or video.camera:
                yield from self._predict_frames(waiting)
                waiting = []
        yield from self._predict_frames(waiting)

    def _predict_frames(self, waiting):
        """[(VideoFrame, boxes, squares, crops, ids)] -> the VideoFrames with their faces' answers."""
        counts = [len(crops) for _, _, _, crops, _ in waiting]
        probs = torch.empty(0, len(self.classes))
        if sum(counts):
            encoded = {}  # a subtitle line is shown in several frames: encode it once
            for frame, *_ in waiting:
                if frame.text not in encoded:
                    encoded[frame.text] = encode_counted(self.tokenizer, [frame.text or ""], self.max_len)[:2]
            texts = [encoded[frame.text] for frame, *_ in waiting]
            input_ids = torch.cat([ids.expand(n, -1) for (ids, _), n in zip(texts, counts)])  # (F, L)
            lengths = torch.cat([length.expand(n) for (_, length), n in zip(texts, counts)])  # (F,)
            crops = np.stack([crop for _, _, _, crops, _ in waiting for crop in crops])  # (F, S, S)
            probs = self.probabilities(torch.from_numpy(crops), input_ids, lengths)
        for (frame, boxes, squares, _, ids), frame_probs in zip(waiting, probs.split(counts)):
            frame.faces = [VideoFace(list(box), [x, y, side, side], self.classes[int(p.argmax())],
                                     dict(zip(self.classes, p.tolist())), face)
                           for box, (x, y, side), p, face in zip(boxes, squares, frame_probs, ids)]
            yield frame

    def _predict_chunk(self, pairs, batch_size, errors, keep_inputs):
        prepared = []
        for pair in pairs:
            try:
                item = self.prepare(*pair_parts(pair))
                prepared.append(item if keep_inputs else replace(item, photo=None))
            # Exception, not DataError alone: an odd photo (an OpenCV error, say) must not end a
            # batch of thousands, nor every rerun of it
            except Exception as err:
                if not isinstance(err, DataError):
                    image = pair_parts(pair)[0]
                    where = image if isinstance(image, (str, os.PathLike)) else "the pair"
                    err = DataError(f"{where} could not be predicted ({one_line(err)})")
                if errors == "raise":
                    raise err
                prepared.append(err)
        ready = [p for p in prepared if isinstance(p, PreparedPair)]
        if not ready:
            yield from prepared
            return
        # every face of the chunk, each beside its pair's sentence
        counts = [len(p.crops) for p in ready]
        crops = torch.cat([p.crops for p in ready])  # (F, S, S)
        input_ids = torch.cat([p.input_ids.expand(n, -1) for p, n in zip(ready, counts)])  # (F, L)
        lengths = torch.cat([p.lengths.expand(n) for p, n in zip(ready, counts)])  # (F,)
        # Sorted by sentence length, each batch is trimmed to its own longest sentence: less
        # padding. Batches of equal size (at most batch_size), not full ones and a small rest.
        order = torch.argsort(lengths, stable=True)
        probs = torch.empty(len(crops), len(self.classes))
        for rows in order.tensor_split(-(-len(order) // batch_size)):
            probs[rows] = self.probabilities(crops[rows], input_ids[rows], lengths[rows])
        per_pair = iter(probs.split(counts))
        for item in prepared:
            yield self.result(item, next(per_pair), keep_inputs) if isinstance(item, PreparedPair) else item


# ---- batch mode's files ------------------------------------------------------------
# Batch mode reads a user's CSV of pairs or a folder of photos, and appends its answers to a
# predictions CSV that a later run resumes from (demo.py --pairs and --images):
#
#     pairs = read_pairs("pairs.csv")                    # columns image,text -> [Pair]
#     pairs = read_pairs("mine.csv", columns=LABELLED)   # image,text,label: evaluate.py --pairs
#     pairs = folder_pairs("photos/", text=None)         # every photo in a folder, by name
#     with PredictionsFile("predictions.csv", classes, pairs, recognizer.fingerprint()) as out:
#         for pair in out.todo:                          # the pairs that have no answer in it yet
#             out.append(pair, prediction)               # one row per face, flushed at once
#
# A cell may be empty (no image, or no text), and a photo's path is relative to the CSV. A
# file that cannot be read as such a CSV (a missing column, bytes that are not UTF-8) is one
# DataError that names the line.
#
# The predictions CSV holds the answers to one set of pairs. Each row carries a key, a digest
# of what its answer depends on: the pair's line, its photo's path and bytes, its sentence, and
# the checkpoints. A run keeps the rows whose key is the key of one of its pairs, drops the
# others (answers to a photo, sentence or checkpoint that has changed since, or to other
# inputs), and appends the answers to the rest, all the rows of a pair in one write. A stopped
# run can leave the file cut anywhere, even inside a quoted sentence or a character: the next
# run cuts it back to its last whole row, drops the pair that row belongs to if not all of its
# rows are there, and predicts that pair again.

PAIRED = ("image", "text")
BOX = ("box_x", "box_y", "box_w", "box_h")  # a face box's columns, in batch mode's and the video's CSVs
LABELLED = ("image", "text", "label")


# eq=False: two identical rows are still two pairs, and a pair can be a dict key
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
    With `cut`, the file may end inside a character (a run stopped while writing it), and that
    character is dropped."""
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
        # its row is an error; once the photo can be read, the key changes and the pair is predicted
        except OSError:
            pass
    return hashlib.sha256(json.dumps([pair.line, pair.image, photo, pair.text, fingerprint]).encode()).hexdigest()[:16]


def whole_rows(text):
    """A CSV text that a stopped run may have cut anywhere -> (its whole rows as the csv parser
    reads them, the text up to their end). A row is whole if it ends at a line end that the
    parser reads outside quotes: a cut after a newline inside a quoted sentence ends no row."""
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
        # the text ran out inside the row (an open quote), or the row's last line has no line end
        if ended or text[read - 1] != "\n":
            break
        rows.append(row)
        end = read
    return rows, text[:end]


def prediction_columns(classes):
    """The predictions CSV's header: one row per face; the last column is the answer's key."""
    return ["line", "image", "text", "face", "faces", *BOX, "label",
            *classes, "inputs", "truncated", "error", "warning", "key"]


def prediction_rows(pair, key, outcome, classes):
    """A Pair, its answer_key and its recognizer Prediction (or the DataError that stopped it) ->
    CSV rows: one per face, one for the centre square or blank face when none was found, one for
    an error."""
    common = {"line": "" if pair.line is None else pair.line, "image": pair.image, "text": pair.text or "",
              "key": key}

    def named(message):
        # the photo is named as the image column names it, so that a kept row reads as a new one
        # would, wherever the inputs lie now
        return message if pair.path is None else message.replace(str(pair.path), pair.image)

    if isinstance(outcome, Exception):
        return [{**common, "faces": 0, "error": named(str(outcome))}]
    faces = outcome.faces or [None]
    rows = []
    for number, face in enumerate(faces, 1):
        box = face.box if face else ["", "", "", ""]
        answer = face or outcome
        rows.append({**common, "face": number if face else "", "faces": len(outcome.faces),
                     **dict(zip(BOX, box)), "label": answer.label,
                     **{name: round(answer.probabilities[name], 6) for name in classes},
                     "inputs": "+".join(outcome.inputs), "truncated": outcome.truncated,
                     "warning": named("; ".join(outcome.warnings))})
    return rows


def whole_answer(rows):
    """Whether all the rows of one pair are there: one per face, or one when no face was found."""
    faces = rows[0]["faces"]
    return faces.isdigit() and len(rows) == max(int(faces), 1)


def cannot_write(path, err):
    """An OSError writing `path` (a full disk, say) -> the DataError to show."""
    return DataError(f"cannot write {path}: {err.strerror or err}")


class CsvFile:
    """A CSV that a run appends to, each group of rows in one write, flushed at once, so that a
    stopped run keeps them: what the predictions file and the video timeline (demo.py) share."""

    def __init__(self, path, columns):
        self.path = Path(path)
        self.columns = columns
        self.file = None

    def table(self, rows, header=True):
        """Rows (dicts) -> their CSV text, after the header where `header`."""
        out = io.StringIO()
        # "\r\n", the csv module's own line end: with it, a sentence holding a lone "\r" is quoted too
        writer = csv.DictWriter(out, self.columns, restval="", lineterminator="\r\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def rewrite(self, rows):
        """Rewrite the file as the header and `rows`, whole or not at all."""
        with atomic_write(self.path) as tmp:
            tmp.write_text(self.table(rows), encoding="utf-8", newline="")

    def open(self):
        try:
            self.file = open(self.path, "a", newline="", encoding="utf-8")
        except OSError as err:
            raise cannot_write(self.path, err) from None

    def write(self, rows):
        """Rows written in one go and flushed: an interrupted run keeps them."""
        try:
            self.file.write(self.table(rows, header=False))
            self.file.flush()
        except OSError as err:
            raise cannot_write(self.path, err) from None

    def close(self):
        # After a failed write, closing tries the rows still buffered once more. fsync, so that a
        # power cut loses no row that the run reported as written.
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as err:
            raise cannot_write(self.path, err) from None


class PredictionsFile(CsvFile):
    """The predictions CSV of `pairs`, opened for appending. `todo` holds the pairs that have no
    whole answer in it yet, and `dropped` counts the answers in it that match none of these
    pairs as they are now (a photo, sentence or checkpoint changed since, or other inputs).
    Those answers, and the rows of a pair that a stopped run cut short, are removed: the file
    is rewritten atomically without them."""

    def __init__(self, path, classes, pairs, fingerprint):
        super().__init__(path, prediction_columns(classes))
        self.classes = classes
        self.keys = {pair: answer_key(pair, fingerprint) for pair in pairs}
        self.todo = list(pairs)
        self.dropped = 0

    def __enter__(self):
        try:
            text = decoded(self.path, cut=True) if self.path.exists() else ""
            # no file, an empty one, or one whose header a stopped run cut short: begin it
            if self.table([]).startswith(text):
                self.rewrite([])
            else:
                self._resume(text)
        except OSError as err:
            raise cannot_write(self.path, err) from None
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def _resume(self, text):
        """Read the text that an earlier run wrote: keep the whole answers to these pairs, and
        drop the rest."""
        try:
            rows, whole = whole_rows(text)
        except csv.Error as err:
            raise DataError(f"{self.path} is not a predictions file ({err}): pass another --out") from None
        if not rows or rows[0] != self.columns:
            raise DataError(f"{self.path} is not a predictions file that this version writes for this "
                            "checkpoint's classes (its header differs): pass another --out")
        answers = {}
        for values in rows[1:]:
            # a row of another length is not an answer of this file (None is the key of no pair)
            key = values[-1] if len(values) == len(self.columns) else None
            answers.setdefault(key, []).append(dict(zip(self.columns, values)))
        wanted = set(self.keys.values())
        done = {key for key, answer in answers.items() if key in wanted and whole_answer(answer)}
        self.dropped = len(answers.keys() - wanted)
        self.todo = [pair for pair in self.todo if self.keys[pair] not in done]
        kept = [row for key, answer in answers.items() if key in done for row in answer]
        # the file's bytes, not the text's characters: a character cut short was dropped from the text
        if len(kept) < len(rows) - 1 or len(whole.encode("utf-8")) < self.path.stat().st_size:
            self.rewrite(kept)

    def append(self, pair, outcome):
        """The rows of one pair, written in one go and flushed: an interrupted run keeps them."""
        self.write(prediction_rows(pair, self.keys[pair], outcome, self.classes))

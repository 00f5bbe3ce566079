"""The Python API: load a checkpoint (or several: an ensemble) once, then predict the emotion
of a face photo, a sentence or both, one pair at a time or many batched through the model.

    from recognizer import EmotionRecognizer
    recognizer = EmotionRecognizer.load("checkpoints/model_b/best.pt", device="auto")
    result = recognizer.predict(image="face.jpg", text="what a day")   # either input alone is fine
    result.label, result.probabilities, result.faces
    results = recognizer.predict_many([("a.jpg", "so happy"), ("b.png", None)], batch_size=64)

`image` is a path, a PIL image or a numpy uint8 array, gray (H, W) or RGB (H, W, 3). Every
face found gets its own result, largest first; the answer is the largest face's, or the
centre square's when none is found. A missing input is the evaluation's blank (a gray face,
an empty sentence). Probabilities are calibrated with each checkpoint's temperature, and an
ensemble averages its members' calibrated probabilities. The model runs in fp32 whatever the
batch, so predict_many gives what single predict calls give, to float rounding.
No path: the best run under checkpoints/ on the data set trained last (default_checkpoint).

demo.py and evaluate.py --pairs are command lines over this module. Not here: the files of
pairs and of predictions (pairs.py), finding and cropping faces (images.py), the --explain
figure (explain.py), loading one checkpoint (checkpoints.py).
"""
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from checkpoints import CheckpointError, load_checkpoint
from data import BLANK_PIXEL
from images import as_photo, face_crops, to_gray
from runtime import DataError, one_line, pick_device
from tokenizer import encode_counted
from training import read_log

# a --modality as the notes, the default-checkpoint line and the explain figure name it
MODALITY_NAMES = {"both": "fused", "image": "image-only", "text": "text-only"}
# what a model reads in place of a missing input (the evaluation's ablation blanks)
BLANKS = {"image": "a blank gray face", "text": "an empty sentence"}
# predict_many sorts this many batches of pairs by sentence length at a time, so that each
# batch is trimmed to a length near its own sentences': Model B's Transformer, 2/3 of its CPU
# time, reads padding as it reads words
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
        self.members = members  # [(model, tokenizer, info)], load_members'
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
        bytes, in any order (an ensemble's mean is the same), and whether faces are looked for.
        Reading the files again costs little: loading them has just read them."""
        members = []
        for path in self.paths:
            with open(path, "rb") as f:
                members.append(hashlib.file_digest(f, "sha256").hexdigest())
        return hashlib.sha256(json.dumps([sorted(members), self.detect]).encode()).hexdigest()[:16]

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

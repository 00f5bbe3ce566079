"""Predict the emotion of a face photo, a sentence, or both, with a trained checkpoint (or an
ensemble of several): one pair, a CSV of pairs, a folder of photos, or a video.

    python demo.py --image photo.jpg --text "I can't stop smiling today"
    python demo.py --image photo.jpg --text "so tired of this" --json
    python demo.py --image photo.jpg                    # the face alone
    python demo.py --text "what a day"                  # the sentence alone
    python demo.py --image photo.jpg --text "what a day" --explain explain.png
    python demo.py --examples 8 --out examples.png      # test pairs with predictions
    python demo.py --pairs pairs.csv --out predictions.csv          # columns image,text
    python demo.py --images photos/ --text "first day at school" --out predictions.csv
    python demo.py --image photo.jpg --checkpoint s0/best.pt s1/best.pt s2/best.pt  # an ensemble
    python demo.py --video talk.mp4 --subtitles talk.srt --out talk.csv --plot talk.png
    python demo.py --video 0 --out camera.csv            # the first camera, until Ctrl-C

--image and --text are each optional, but one is needed unless --examples, --pairs or
--images is given; a missing one is the evaluation's blank (a gray face, an empty sentence),
and a model trained without --modality-dropout warns. Each face in the photo is found and
cropped like the training faces (images.py); the sentence is shared by every face.
Probabilities are calibrated with the checkpoint's temperature; several checkpoints average
theirs. The default checkpoint is the best run under checkpoints/ on the data set trained last
(fused first, then val macro-F1).

Batch mode (--pairs, --images) writes one CSV row per face: the file, the face box, the label,
the seven probabilities, the inputs read, whether the sentence was cut, and an error or a
warning. In a pairs CSV either cell may be empty, and photo paths are relative to the CSV. A
photo that cannot be read gets its reason in the error column and the run goes on. Rows are
appended as their batch is done: run the same command again after a stop, and it goes on
with the pairs not yet in --out. Each row keeps a key of what its answer depends on (the line,
the photo's path and bytes, the sentence, the checkpoints): a run keeps only the rows that
answer its own pairs as they are now, and predicts the rest. recognizer.py (the Python API)
makes the predictions themselves.

Video (--video FILE or a camera index) samples --fps frames per second, finds every face and
keeps an id on each across frames, and pairs each frame with the --subtitles line (SRT or
WebVTT) shown at its time; a frame without a line is read from its faces alone. --out gets
one row per sampled frame and face (one row saying so for a frame without a face), written as
it is made; with subtitles, OUT-lines.csv beside it gets each line's mean probabilities per
face. Run the same command again after a stop, and a video file goes on after its last
complete frame; a camera runs until Ctrl-C, and keeps its rows.
"""
import hashlib
import json
import os
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from models import CheckpointError, check_compatible
from data import load_meta, load_split, load_tokenizer
from explain import pyplot, save_explanation, save_timeline
from images import FaceTracker, as_photo, open_video, read_subtitles, video_frames
from recognizer import (BLANKS, BOX, CsvFile, EmotionRecognizer, PredictionsFile, cannot_write, decoded,
                        default_checkpoint, folder_pairs, read_pairs, whole_rows)
from runtime import DataError, atomic_write, pick_device, positive_int, progress, script_parser


def report(result, as_json, explanation):
    """Print the largest face's label and probabilities, then one line (or entry) per other face."""
    if as_json:
        answer = result.to_dict()
        print(json.dumps({**answer, **({"explanation": explanation} if explanation else {})}))
        return
    print(result.label)
    for name, p in sorted(result.probabilities.items(), key=lambda item: -item[1]):
        print(f"  {name:9s} {p:6.1%} {'#' * round(p * 40)}")
    for face in result.faces[1:]:
        print(f"  another face at [x, y, w, h] = {face.box}: {face.label} "
              f"({face.probabilities[face.label]:.0%})")
    if explanation:
        print(f"explanation: {explanation}")


def show_examples(recognizer, count, data_dir, out, seed):
    """Draw a grid of random test pairs: each face, its sentence, and the true and predicted labels."""
    plt = pyplot()
    data_tokenizer = load_tokenizer(data_dir)
    meta = load_meta(data_dir)
    # the ids must mean the same words
    for _, _, info in recognizer.members:
        check_compatible(info, data_tokenizer, meta)
    test = load_split(data_dir, "test")
    picks = torch.randperm(len(test["labels"]), generator=torch.Generator().manual_seed(seed))[:count]
    texts = [recognizer.tokenizer.decode(test["input_ids"][i, :test["lengths"][i]].tolist()) for i in picks]
    probs = recognizer.probabilities(test["images"][picks], test["input_ids"][picks], test["lengths"][picks])
    classes = recognizer.classes
    cols = min(count, 4)
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, text, p in zip(axes.flat, picks, texts, probs):
        true = classes[test["labels"][i]]
        pred = classes[int(p.argmax())]
        ax.imshow(test["images"][i].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {true} | pred {pred} ({p.max():.2f})", fontsize=9,
                     color="green" if true == pred else "red")
        # the default font has no emoji
        printable = "".join(ch for ch in text if ord(ch) <= 0xFFFF)
        ax.text(0.5, -0.04, textwrap.fill(printable, 34), transform=ax.transAxes, ha="center",
                va="top", fontsize=8)
    fig.tight_layout()
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    accuracy = float((probs.argmax(1) == test["labels"][picks]).float().mean())
    print(f"{len(picks)} test pairs, {accuracy:.0%} right: {out}")


def check_writable(path):
    """Refuse an output path before any work: its folder must exist and be writable."""
    folder = Path(path).absolute().parent
    if Path(path).is_dir():
        raise DataError(f"cannot write {path}: it is a folder")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DataError(f"cannot write {path}: {folder} is not a writable folder")


def build_parser():
    p = script_parser(__doc__)
    one = "optional, but --image, --text or both are needed unless --examples is given (or --pairs, --images)"
    p.add_argument("--image", help=f"a photo with faces, or a face crop: any image Pillow opens; {one}")
    p.add_argument("--text", help=f"the sentence that goes with the face; {one}; with --images, "
                   "the sentence of every photo")
    p.add_argument("--checkpoint", nargs="+", metavar="PATH", help="a best.pt, or several for an "
                   "ensemble (their calibrated probabilities averaged); default: a run under checkpoints/, "
                   "named on stderr, from the runs on the data set trained last (runs on other data, such "
                   "as the synthetic quick start, are not compared): a fused run first, then the best val "
                   "macro-F1, then Model B")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the bar list")
    p.add_argument("--explain", metavar="PNG", help="also draw what the prediction rests on: face boxes, "
                   "a heatmap over the crop, each token's effect, the probabilities")
    p.add_argument("--no-detect", action="store_true",
                   help="do not look for faces: the centre square of each photo is its face")
    p.add_argument("--examples", type=positive_int, metavar="N",
                   help="instead of one prediction, draw N random test pairs with predictions into --out")
    p.add_argument("--pairs", metavar="CSV", help="predict every row of a CSV with the columns image,text "
                   "(either may be empty; photo paths relative to the CSV) into --out")
    p.add_argument("--images", metavar="DIR", help="predict every photo in a folder (not its subfolders), "
                   "with --text or none, into --out")
    p.add_argument("--video", metavar="FILE|N", help="predict every face of a video file (any file OpenCV "
                   "reads: mp4, avi, mkv, webm) or of camera N (0 is the first) over time into --out")
    p.add_argument("--subtitles", metavar="SRT", help="with --video: an SRT or WebVTT file; each frame is read "
                   "with the line shown at its time")
    p.add_argument("--fps", type=float, default=5.0, help="with --video: frames sampled per second (at most the "
                   "video's own rate)")
    p.add_argument("--plot", metavar="PNG", help="with --video: draw each face's probabilities over time, "
                   "the subtitle lines shaded")
    p.add_argument("--annotate", metavar="MP4", help="with a --video file: write the sampled frames with each "
                   "face's box, id and label drawn on them")
    p.add_argument("--out", help="the file written: with --examples a PNG (default: examples.png); with "
                   "--pairs or --images the predictions CSV: run again, it keeps the answers to these inputs "
                   "as they are now, drops the others and predicts the rest (default: predictions.csv); with "
                   "--video the timeline CSV, one row per frame and face (default: timeline.csv)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="with --pairs or --images: the number of faces per forward pass")
    p.add_argument("--data", default="data/processed", help="the prepared data --examples draws from")
    p.add_argument("--seed", type=int, default=0, help="which test pairs --examples draws")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    batch = args.pairs is not None or args.images is not None or args.video is not None
    modes = [flag for flag, value in (("--examples", args.examples), ("--pairs", args.pairs),
                                      ("--images", args.images), ("--video", args.video)) if value]
    if len(modes) > 1:
        p.error(f"{' and '.join(modes)} are two runs: give one")
    if args.examples and (args.image is not None or args.text is not None):
        p.error("--examples draws its own test pairs: leave out --image and --text")
    if batch and (args.image is not None or ((args.pairs or args.video) and args.text is not None)):
        p.error(f"{modes[0]} reads its own inputs: leave out --image"
                + (" and --text" if args.pairs or args.video else ""))
    video_only = [flag for flag, value in (("--subtitles", args.subtitles), ("--plot", args.plot),
                                           ("--annotate", args.annotate)) if value]
    if video_only and args.video is None:
        p.error(f"{video_only[0]} goes with --video")
    if args.video is not None and args.no_detect:
        p.error("--video finds the faces in each frame: leave out --no-detect")
    if not args.fps > 0:
        p.error(f"--fps must be above 0, not {args.fps:g}")
    if not modes and args.image is None and args.text is None:
        p.error("give --image FILE, --text TEXT or both (either alone is enough), or --examples N, "
                "--pairs CSV, --images DIR or --video FILE")
    if not (args.examples or batch) and args.out is not None:
        p.error("--out names what --examples, --pairs, --images or --video write: for one prediction, "
                "leave it out (--explain PNG draws it)")
    if (args.examples or batch) and (args.json or args.explain):
        p.error(f"--json and --explain are for one prediction, not {modes[0]}")
    if args.explain and args.checkpoint and len(args.checkpoint) > 1:
        p.error("--explain draws one model's attention: give one --checkpoint")
    if args.out is None and (args.examples or batch):
        args.out = "examples.png" if args.examples else "timeline.csv" if args.video else "predictions.csv"
    return args


def predict_one(args, recognizer, photo):
    """Predict one pair: print the notes on stderr, then the answer (and draw --explain's figure)."""
    result = recognizer.predict(image=photo, text=args.text)
    for line in recognizer.input_notes({"image": photo is not None, "text": args.text is not None}):
        print(line, file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # the figure is written before any output, so that a failed write leaves stdout empty
    if args.explain:
        model, tokenizer, info = recognizer.members[0]
        probs = torch.tensor([result.probabilities[name] for name in recognizer.classes])
        save_explanation(args.explain, model, tokenizer, info, recognizer.paths[0], result.prepared, probs,
                         recognizer.device, Path(args.image or "").name)
    report(result, args.json, args.explain)
    return 0


def gist(message, pair):
    """A row's error or warning cut to its kind, for the closing line: 'no such file'."""
    if pair.path is not None:
        message = message.replace(f" in {pair.path}", "").replace(str(pair.path), "")
    return message.strip(" :").split(" (")[0].split(": ")[0].removeprefix("is ")


def tally(counts):
    """'2 no such file, 1 no face found': the reasons, most frequent first."""
    return ", ".join(f"{n} {why}" for why, n in counts.most_common())


def batch_notes(recognizer, pairs):
    """On stderr, once for each kind of pair with one input (not once per row): how many, what
    the model reads in place of the other, and the warning of a model that never saw that."""
    kinds = Counter((pair.path is not None, pair.text is not None) for pair in pairs)
    warnings = {}
    for (image, text), count in sorted(kinds.items()):
        if image != text:
            missing = "text" if image else "image"
            print(f"note: {count} pair(s) without {missing}: the model reads {BLANKS[missing]} in its place",
                  file=sys.stderr)
            notes = recognizer.input_notes({"image": image, "text": text})
            warnings.update(dict.fromkeys(line for line in notes if line.startswith("warning:")))
    for line in warnings:
        print(line, file=sys.stderr)


def predict_batch(args, recognizer, pairs):
    """--pairs or --images: append each pair's rows to --out as its batch is done, and skip the
    pairs already there; a bad pair becomes a row with its error, and the run goes on."""
    failed = Counter()
    warned = Counter()
    rows = 0
    with PredictionsFile(args.out, recognizer.classes, pairs, recognizer.fingerprint()) as predictions:
        todo = predictions.todo
        if predictions.dropped:
            print(f"note: {args.out} held {predictions.dropped} answer(s) to inputs that are not these (a photo, "
                  "sentence, line or checkpoint changed since, or other inputs): dropped", file=sys.stderr)
        batch_notes(recognizer, todo)
        inputs = ((pair.path, pair.text) for pair in progress(todo, "predicting", unit="pairs"))
        outcomes = recognizer.iter_predictions(inputs, args.batch_size, errors="return")
        start = time.perf_counter()
        try:
            for pair, outcome in zip(todo, outcomes):
                predictions.append(pair, outcome)
                if isinstance(outcome, Exception):
                    failed[gist(str(outcome), pair)] += 1
                    rows += 1
                    continue
                rows += max(len(outcome.faces), 1)
                for warning in outcome.warnings:
                    warned[gist(warning, pair)] += 1
        except KeyboardInterrupt:
            print(f"stopped: {rows} row(s) are in {args.out}; the same command goes on from there",
                  file=sys.stderr)
            return 130
    seconds = time.perf_counter() - start
    skipped = len(pairs) - len(todo)
    # the rate after start-up: what batching buys (bench.py reads it)
    print(f"{args.out}: {len(todo)} pair(s) predicted, {rows} row(s) written"
          + (f", {skipped} pair(s) there already" if skipped else "")
          + f"; {sum(failed.values())} row(s) failed" + (f" ({tally(failed)})" if failed else "")
          + (f"; {sum(warned.values())} warning(s) ({tally(warned)})" if warned else "")
          + f" | {seconds:.1f} s, {len(todo) / max(seconds, 1e-9):.1f} pairs/s")
    return 0


# ---- video: the timeline CSV, the per-line CSV, the annotated copy ------------------------

def timeline_columns(classes):
    """The timeline CSV's header: one row per sampled frame and face."""
    return ["time", "frame", "faces", "face", *BOX, "label", *classes,
            "text", "error", "warning", "key"]


def video_key(args, video, lines, fingerprint):
    """What every row of a timeline depends on, as 16 hex digits: the video file's path, size and
    time of change (a camera has none), the subtitle lines, the sampling rate and the checkpoints."""
    source = video.name
    if not video.camera:
        stat = Path(video.name).stat()
        source = [str(Path(video.name).resolve()), stat.st_size, stat.st_mtime_ns]
    subtitles = [[line.start, line.end, line.text] for line in lines]
    return hashlib.sha256(json.dumps([source, subtitles, video.fps, fingerprint]).encode()).hexdigest()[:16]


class TimelineFile(CsvFile):
    """The timeline CSV, opened for appending: one frame's rows in one write. Opening it keeps the
    whole frames that an earlier run of the same command wrote (`kept`, one list of row dicts per
    frame) and drops the rest: a frame that a stop cut short, or rows of another video, subtitle
    file, rate or checkpoint (`dropped` counts those)."""

    def __init__(self, path, classes, key):
        super().__init__(path, timeline_columns(classes))
        self.classes = classes
        self.key = key
        self.dropped = 0
        text = decoded(self.path, cut=True) if self.path.exists() else ""
        rows, whole = whole_rows(text)
        if rows and rows[0] != self.columns:
            raise DataError(f"{self.path} is not a timeline that this version writes for this checkpoint's "
                            "classes (its header differs): pass another --out")
        frames = {}
        for values in rows[1:]:
            row = dict(zip(self.columns, values))
            if len(values) != len(self.columns) or row["key"] != key:
                self.dropped += 1
                continue
            frames.setdefault(row["frame"], []).append(row)
        self.kept = [rows for rows in frames.values() if len(rows) == max(int(rows[0]["faces"]), 1)]
        # no file, one without a whole row, or rows to drop: write it anew
        if not rows or sum(map(len, self.kept)) < len(rows) - 1 or len(whole) < len(text):
            try:
                self.rewrite([row for rows in self.kept for row in rows])
            except OSError as err:
                raise cannot_write(self.path, err) from None
        self.open()

    def rows(self, frame):
        """A recognizer.VideoFrame -> its rows: one per face, or one that says why there is none."""
        common = {"time": f"{frame.time:.3f}", "frame": frame.index, "faces": len(frame.faces),
                  "text": frame.text or "", "key": self.key}
        if not frame.faces:
            return [{**common, **({"error": frame.error} if frame.error else {"warning": "no face found"})}]
        return [{**common, "face": face.id, **dict(zip(BOX, face.box)),
                 "label": face.label, **{name: round(face.probabilities[name], 6) for name in self.classes}}
                for face in frame.faces]

    def append(self, frame):
        self.write(self.rows(frame))


def read_timeline(path, classes):
    """The whole rows of a timeline CSV that have a face -> [(time, face id, box, probabilities [C])]."""
    rows, _ = whole_rows(decoded(path))
    faces = []
    for values in rows[1:]:
        row = dict(zip(rows[0], values))
        if row.get("face"):
            box = [int(row[k]) for k in BOX]
            faces.append((float(row["time"]), int(row["face"]), int(row["frame"]), box, row["label"],
                          np.array([float(row[name]) for name in classes])))
    return faces


def line_rows(faces, lines, classes):
    """The per-line CSV's rows: for each subtitle line and each face seen while it is shown, the
    mean of that face's calibrated probabilities over the line's frames."""
    rows = []
    for line in lines:
        shown = {}
        for at, face, _, _, _, probs in faces:
            if line.start <= at < line.end:
                shown.setdefault(face, []).append(probs)
        for face, probs in sorted(shown.items()):
            mean = np.mean(probs, axis=0)
            rows.append({"start": f"{line.start:.3f}", "end": f"{line.end:.3f}", "text": line.text, "face": face,
                         "frames": len(probs), "label": classes[int(mean.argmax())],
                         **{name: round(float(p), 6) for name, p in zip(classes, mean)}})
    return rows


def write_lines(path, faces, lines, classes):
    """The per-line CSV, written whole."""
    columns = ["start", "end", "text", "face", "frames", "label", *classes]
    CsvFile(path, columns).rewrite(line_rows(faces, lines, classes))


def annotate(path, video_path, fps, faces):
    """The sampled frames of the video file with each face's box, id and label drawn, as an MP4."""
    import cv2  # deferred: start-up time
    by_frame = {}
    for _, face, index, box, label, _ in faces:
        by_frame.setdefault(index, []).append((face, box, label))
    video = open_video(video_path, fps)
    writer = None
    with atomic_write(path) as tmp:
        for _, index, frame in video_frames(video):
            picture = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            if writer is None:
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), video.fps,
                                         (picture.shape[1], picture.shape[0]))
            for face, (x, y, w, h), label in by_frame.get(index, []):
                cv2.rectangle(picture, (x, y), (x + w, y + h), (0, 255, 0), 2)
                cv2.putText(picture, f"{face} {label}", (x, max(y - 6, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                            (0, 255, 0), 2)
            writer.write(picture)
        if writer is not None:
            writer.release()


def predict_timeline(args, recognizer, video, lines):
    """--video: append each sampled frame's rows to --out as it is made, going on after the last
    whole frame of an earlier run of the same command; then the per-line CSV, --plot and --annotate."""
    for warning in video.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if lines and video.duration and lines[-1].end > video.duration:
        print(f"warning: the subtitles run to {lines[-1].end:.1f} s, past the video's end at "
              f"{video.duration:.1f} s: the lines after it match no frame", file=sys.stderr)
    if video.camera and Path(args.out).exists():
        raise DataError(f"{args.out} exists: a camera run starts a new timeline, give another --out")
    timeline = TimelineFile(args.out, recognizer.classes, video_key(args, video, lines, recognizer.fingerprint()))
    if timeline.dropped:
        print(f"note: {args.out} held {timeline.dropped} row(s) of another video, subtitle file, --fps or "
              "checkpoint: dropped", file=sys.stderr)
    tracker = FaceTracker()
    for rows in timeline.kept:
        tracker.remember([int(row["face"]) for row in rows if row["face"]],
                         [[int(row[k]) for k in BOX] for row in rows if row["face"]])
    after = float(timeline.kept[-1][0]["time"]) if timeline.kept else None
    if after is not None:
        print(f"note: {args.out} holds {len(timeline.kept)} frame(s) already: going on after {after:.3f} s",
              file=sys.stderr)
    frames = faceless = 0
    stopped = False
    start = time.perf_counter()
    try:
        for frame in progress(recognizer.predict_video(video, lines, after=after, tracker=tracker),
                              "reading the video", unit="frames"):
            timeline.append(frame)
            frames += 1
            faceless += not frame.faces
    except KeyboardInterrupt:
        stopped = True
    finally:
        timeline.close()
    seconds = time.perf_counter() - start
    faces = read_timeline(args.out, recognizer.classes)
    written = [args.out]
    if lines:
        lines_path = Path(args.out).with_name(Path(args.out).stem + "-lines.csv")
        write_lines(lines_path, faces, lines, recognizer.classes)
        written.append(str(lines_path))
    if args.plot:
        save_timeline(args.plot, faces, lines, recognizer.classes)
        written.append(args.plot)
    if args.annotate and not stopped:
        annotate(args.annotate, video.name, video.fps, faces)
        written.append(args.annotate)
    print(f"{', '.join(written)}: {frames} frame(s) sampled, {faceless} without a face, "
          f"{len({face for _, face, *_ in faces})} face id(s) | {seconds:.1f} s, {frames / max(seconds, 1e-9):.1f} "
          "frames/s")
    if stopped and not video.camera:
        print(f"stopped: the same command goes on after the last frame in {args.out}", file=sys.stderr)
        return 130
    return 0


def run(args):
    for flag, value, other in (("--image", args.image, "sentence"), ("--text", args.text, "face")):
        if value is not None and not value.strip():
            raise DataError(f"{flag} is empty: give one, or leave {flag} out to read the {other} alone")
    for output in (args.out or args.explain, args.plot, args.annotate):
        if output:
            check_writable(output)
    # the inputs are read before the checkpoint: a bad photo or CSV is reported before seconds of loading
    pairs = None
    if args.pairs is not None:
        pairs = read_pairs(args.pairs)
    elif args.images is not None:
        pairs = folder_pairs(args.images, args.text)
    photo = as_photo(args.image) if args.image is not None else None
    lines = read_subtitles(args.subtitles) if args.subtitles else []
    video = open_video(int(args.video) if args.video.isdigit() else args.video, args.fps) if args.video else None
    if video and video.camera and args.annotate:
        raise DataError("--annotate needs a video file: a camera's frames are not kept")
    device = pick_device(args.device)
    checkpoints = args.checkpoint
    if checkpoints is None:
        checkpoint, why = default_checkpoint()
        print(f"note: using {checkpoint} ({why})", file=sys.stderr)
        checkpoints = [checkpoint]
    recognizer = EmotionRecognizer.load(checkpoints, device, detect=not args.no_detect)
    if args.examples:
        show_examples(recognizer, args.examples, args.data, args.out, args.seed)
        return 0
    if pairs is not None:
        return predict_batch(args, recognizer, pairs)
    if video is not None:
        return predict_timeline(args, recognizer, video, lines)
    return predict_one(args, recognizer, photo)


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

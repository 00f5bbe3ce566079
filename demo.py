"""Predict the emotion of a face photo, a sentence, or both, with a trained checkpoint (or an
ensemble of several): one pair, a CSV of pairs, or a folder of photos.

    python demo.py --image photo.jpg --text "I can't stop smiling today"
    python demo.py --image photo.jpg --text "so tired of this" --json
    python demo.py --image photo.jpg                    # the face alone
    python demo.py --text "what a day"                  # the sentence alone
    python demo.py --image photo.jpg --text "what a day" --explain explain.png
    python demo.py --examples 8 --out examples.png      # test pairs with predictions
    python demo.py --pairs pairs.csv --out predictions.csv          # columns image,text
    python demo.py --images photos/ --text "first day at school" --out predictions.csv
    python demo.py --image photo.jpg --checkpoint s0/best.pt s1/best.pt s2/best.pt  # an ensemble

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
"""
import json
import os
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import torch

from models import CheckpointError, check_compatible
from data import load_meta, load_split, load_tokenizer
from explain import pyplot, save_explanation
from images import as_photo
from recognizer import BLANKS, EmotionRecognizer, PredictionsFile, default_checkpoint, folder_pairs, read_pairs
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
    p.add_argument("--out", help="the file written: with --examples a PNG (default: examples.png); with "
                   "--pairs or --images the predictions CSV: run again, it keeps the answers to these inputs "
                   "as they are now, drops the others and predicts the rest (default: predictions.csv)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="with --pairs or --images: the number of faces per forward pass")
    p.add_argument("--data", default="data/processed", help="the prepared data --examples draws from")
    p.add_argument("--seed", type=int, default=0, help="which test pairs --examples draws")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    batch = args.pairs is not None or args.images is not None
    modes = [flag for flag, value in (("--examples", args.examples), ("--pairs", args.pairs),
                                      ("--images", args.images)) if value]
    if len(modes) > 1:
        p.error(f"{' and '.join(modes)} are two runs: give one")
    if args.examples and (args.image is not None or args.text is not None):
        p.error("--examples draws its own test pairs: leave out --image and --text")
    if batch and (args.image is not None or (args.pairs and args.text is not None)):
        p.error(f"{modes[0]} reads its own inputs: leave out --image" + (" and --text" if args.pairs else ""))
    if not modes and args.image is None and args.text is None:
        p.error("give --image FILE, --text TEXT or both (either alone is enough), or --examples N, "
                "--pairs CSV or --images DIR")
    if not (args.examples or batch) and args.out is not None:
        p.error("--out names what --examples, --pairs or --images write: for one prediction, "
                "leave it out (--explain PNG draws it)")
    if (args.examples or batch) and (args.json or args.explain):
        p.error(f"--json and --explain are for one prediction, not {modes[0]}")
    if args.explain and args.checkpoint and len(args.checkpoint) > 1:
        p.error("--explain draws one model's attention: give one --checkpoint")
    if args.out is None and (args.examples or batch):
        args.out = "examples.png" if args.examples else "predictions.csv"
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


def run(args):
    for flag, value, other in (("--image", args.image, "sentence"), ("--text", args.text, "face")):
        if value is not None and not value.strip():
            raise DataError(f"{flag} is empty: give one, or leave {flag} out to read the {other} alone")
    output = args.out if args.out else args.explain
    if output:
        check_writable(output)
    # the inputs are read before the checkpoint: a bad photo or CSV is reported before seconds of loading
    pairs = None
    if args.pairs is not None:
        pairs = read_pairs(args.pairs)
    elif args.images is not None:
        pairs = folder_pairs(args.images, args.text)
    photo = as_photo(args.image) if args.image is not None else None
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

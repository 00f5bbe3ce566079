"""Predict the emotion of a face photo, a sentence, or both, with a trained checkpoint.

    python demo.py --image photo.jpg --text "I can't stop smiling today"
    python demo.py --image photo.jpg --text "so tired of this" --json
    python demo.py --image photo.jpg                    # the face alone
    python demo.py --text "what a day"                  # the sentence alone
    python demo.py --image photo.jpg --text "what a day" --explain explain.png
    python demo.py --examples 8 --out examples.png      # test pairs with predictions

--image and --text are each optional, but one is needed unless --examples is given; a
missing one is the evaluation's blank (a gray face, an empty sentence), and a model trained
without --modality-dropout warns. Each face in the photo is found and cropped like the
training faces (images.py); the sentence is shared by every face. Probabilities are
calibrated with the checkpoint's temperature. The default checkpoint is the best fused run
under checkpoints/ (Model B first); the checkpoint alone is enough to predict.
"""
import csv
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoints import CheckpointError, check_compatible, load_checkpoint
from data import BLANK_PIXEL, load_meta, load_split, load_tokenizer
from explain import MODALITY_NAMES, predict, pyplot, save_explanation
from images import face_crops, load_photo, to_gray
from runtime import DataError, atomic_write, pick_device, positive_int, script_parser
from tokenizer import encode_texts


@dataclass
class Inputs:
    """What the prediction rests on: the photo and its faces, the sentence and its ids."""
    photo: np.ndarray | None  # uint8 (H, W[, 3]); None: not read
    boxes: list               # face boxes (x, y, w, h)
    squares: list             # each face's crop (x, y, side)
    crops: torch.Tensor       # uint8 (N, S, S)
    text: str                 # "": no sentence read
    input_ids: torch.Tensor   # int32 (1, max_len), 0 = pad
    lengths: torch.Tensor     # int16 (1,)
    truncated: bool           # cut at max_len tokens
    used: list                # ["image"], ["text"] or both


def default_checkpoint(root="checkpoints"):
    """-> (best.pt of the best run, why): fused runs first, then Model B, then val macro-F1."""
    candidates = []
    for best in Path(root).glob("*/best.pt"):
        args_file = best.with_name("args.json")
        log_file = best.with_name("log.csv")
        if not (args_file.exists() and log_file.exists()):
            continue
        run_args = json.loads(args_file.read_text())
        with open(log_file, newline="") as f:
            f1 = max((float(row["val_macro_f1"]) for row in csv.DictReader(f)), default=-1.0)
        modality = run_args.get("modality", "both")
        candidates.append((modality == "both", run_args.get("model") == "b", f1, str(best), modality))
    if not candidates:
        raise DataError(f"no checkpoint found under {root}/*/best.pt: train one "
                        "(`python train.py --model b`) or pass --checkpoint")
    fused, is_b, f1, path, modality = max(candidates)
    why = f"Model {'B' if is_b else 'A'}, {MODALITY_NAMES.get(modality, modality)}, val macro-F1 {f1:.3f}: "
    why += "the best of" if fused else "no fused run among"
    return path, f"{why} {len(candidates)} run(s) under {root}/"


def report(classes, inputs, probs, as_json, explanation):
    """Print the largest face's label and probabilities, then one line (or entry) per other face."""
    faces = [{"box": list(box), "crop": [x, y, side, side], "label": classes[int(p.argmax())],
              "probabilities": dict(zip(classes, p.tolist()))}
             for box, (x, y, side), p in zip(inputs.boxes, inputs.squares, probs)]
    label = classes[int(probs[0].argmax())]
    probabilities = dict(zip(classes, probs[0].tolist()))
    if as_json:
        face = {key: faces[0][key] for key in ("box", "crop")} if faces else None
        answer = {"label": label, "probabilities": probabilities, "face": face, "faces": faces,
                  "inputs": inputs.used, "truncated": inputs.truncated}
        print(json.dumps({**answer, **({"explanation": explanation} if explanation else {})}))
        return
    print(label)
    for name, p in sorted(probabilities.items(), key=lambda item: -item[1]):
        print(f"  {name:9s} {p:6.1%} {'#' * round(p * 40)}")
    for face in faces[1:]:
        print(f"  another face at [x, y, w, h] = {face['box']}: {face['label']} "
              f"({face['probabilities'][face['label']]:.0%})")
    if explanation:
        print(f"explanation: {explanation}")


def show_examples(model, tokenizer, info, device, count, data_dir, out, seed):
    """A grid of random test pairs: face, sentence, true and predicted label."""
    plt = pyplot()
    # the ids must mean the same words
    check_compatible(info, load_tokenizer(data_dir), load_meta(data_dir))
    test = load_split(data_dir, "test")
    picks = torch.randperm(len(test["labels"]), generator=torch.Generator().manual_seed(seed))[:count]
    texts = [tokenizer.decode(test["input_ids"][i, :test["lengths"][i]].tolist()) for i in picks]
    probs = predict(model, test["images"][picks], test["input_ids"][picks], test["lengths"][picks],
                    device, temperature=info["temperature"])
    classes = info["classes"]
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
    one = "optional, but --image, --text or both are needed unless --examples is given"
    p.add_argument("--image", help=f"a photo with faces, or a face crop: any image Pillow opens; {one}")
    p.add_argument("--text", help=f"the sentence that goes with the face; {one}")
    p.add_argument("--checkpoint", help="a best.pt; default: the best fused run under checkpoints/ "
                   "(Model B first, then val macro-F1), named on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the bar list")
    p.add_argument("--explain", metavar="PNG", help="also draw what the prediction rests on: face boxes, "
                   "a heatmap over the crop, each token's effect, the probabilities")
    p.add_argument("--no-detect", action="store_true",
                   help="no face detection: the centre square is the face")
    p.add_argument("--examples", type=positive_int, metavar="N",
                   help="instead of one prediction, draw N random test pairs with predictions into --out")
    p.add_argument("--out", default="examples.png", help="the PNG --examples writes")
    p.add_argument("--data", default="data/processed", help="the prepared data --examples draws from")
    p.add_argument("--seed", type=int, default=0, help="which test pairs --examples draws")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.examples and (args.image is not None or args.text is not None):
        p.error("--examples draws its own test pairs: leave out --image and --text")
    if not args.examples and args.image is None and args.text is None:
        p.error("give --image FILE, --text TEXT or both (either alone is enough), or --examples N")
    return args


def missing_input_notes(model, info, given):
    """Refuse a single-modality checkpoint without its input; on stderr, the inputs not read
    or missing, and a warning when the model never saw a missing input in training."""
    modality = model.cfg.modality
    needed = {"image": model.uses_image, "text": model.uses_text}
    missing = [name for name in ("image", "text") if needed[name] and not given[name]]
    if missing and modality != "both":
        raise DataError(f"this checkpoint reads the {missing[0]} alone (--modality {modality}): "
                        f"give --{missing[0]}")
    for name in ("image", "text"):
        if given[name] and not needed[name]:
            print(f"note: a {MODALITY_NAMES[modality]} checkpoint does not read --{name}", file=sys.stderr)
    if not missing:
        return
    blank = {"image": "a blank gray face", "text": "an empty sentence"}[missing[0]]
    print(f"note: no --{missing[0]}: the model reads {blank} in its place", file=sys.stderr)
    if (info["args"] or {}).get("modality_dropout"):
        return
    ablation = (info["metrics"] or {}).get("val_ablation") or {}
    row = f"no {missing[0]}"
    figure = f"val accuracy with {row}: {ablation[row]:.2f}" if row in ablation else "no val ablation stored"
    figure += f", with both: {ablation['full']:.2f}" if row in ablation and "full" in ablation else ""
    print(f"warning: this checkpoint was trained without --modality-dropout: its scores on one "
          f"input are unreliable ({figure})", file=sys.stderr)


def read_inputs(args, model, tokenizer, info, photo):
    """The crops and token ids the model reads, with a note for each input missing or cut."""
    given = {"image": photo is not None, "text": args.text is not None}
    missing_input_notes(model, info, given)
    used = [name for name in ("image", "text") if given[name] and getattr(model, f"uses_{name}")]
    max_len = model.cfg.max_len
    text = args.text if "text" in used else ""
    input_ids, lengths = encode_texts(tokenizer, [text], max_len)
    if text and lengths[0] == 0:  # control characters alone
        raise DataError("--text has no words the model can read: give the sentence that goes with the face")
    tokens = len(tokenizer.encode(text).ids)
    if tokens > max_len:
        print(f"warning: the sentence has {tokens} tokens and the model reads the first {max_len}: "
              "the rest is cut", file=sys.stderr)
    size = info["image_size"]
    # no image read: the blank face, taken whole
    gray = to_gray(photo) if "image" in used else np.full((size, size), BLANK_PIXEL, np.uint8)
    boxes, squares, crops = face_crops(gray, size, detect="image" in used and not args.no_detect)
    if "image" in used and not (boxes or args.no_detect):
        print(f"warning: no face found in {args.image}: using its centre square "
              "(right for an image that is already a face crop)", file=sys.stderr)
    return Inputs(photo if "image" in used else None, boxes, squares, torch.from_numpy(crops), text,
                  input_ids, lengths, tokens > max_len, used)


def run(args):
    for flag, value, other in (("--image", args.image, "sentence"), ("--text", args.text, "face")):
        if value is not None and not value.strip():
            raise DataError(f"{flag} is empty: give one, or leave {flag} out to read the {other} alone")
    output = args.out if args.examples else args.explain
    if output:
        check_writable(output)
    # the inputs before the checkpoint: a bad photo is reported before seconds of loading
    photo = load_photo(args.image) if args.image is not None else None
    device = pick_device(args.device)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint, why = default_checkpoint()
        print(f"note: using {checkpoint} ({why})", file=sys.stderr)
    model, tokenizer, info = load_checkpoint(checkpoint, device)
    if args.examples:
        show_examples(model, tokenizer, info, device, args.examples, args.data, args.out, args.seed)
        return 0
    inputs = read_inputs(args, model, tokenizer, info, photo)
    count = len(inputs.crops)
    probs = predict(model, inputs.crops, inputs.input_ids.expand(count, -1), inputs.lengths.expand(count),
                    device, temperature=info["temperature"])
    # before any output: a failed write leaves stdout empty
    if args.explain:
        save_explanation(args.explain, model, tokenizer, info, checkpoint, inputs, probs[0], device,
                         Path(args.image or "").name)
    report(info["classes"], inputs, probs, args.json, args.explain)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

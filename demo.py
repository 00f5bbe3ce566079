"""Predict the emotion of a face photo plus a sentence with a trained checkpoint.

    python demo.py --image photo.jpg --text "I can't stop smiling today"
    python demo.py --image photo.jpg --text "so tired of this" --json
    python demo.py --image photo.jpg --text "what a day" --explain explain.png
    python demo.py --examples 8 --out examples.png      # test pairs with predictions

The models learned from tight, aligned face crops, so each face in the photo is found
(OpenCV's Haar cascade) and cropped the same way (images.py); no face -> the centre
square and a warning. The sentence is shared by every face. The default checkpoint is
the best Model B run under checkpoints/ (by val macro-F1), else the best Model A run.
The checkpoint alone is enough: it holds the weights, the tokenizer, the class names
and the raw image size; preprocessing lives in the model.
"""
import argparse
import csv
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from checkpoints import CheckpointError, check_compatible, load_checkpoint
from data import load_meta, load_split, load_tokenizer
from images import centre_square, crop_square, detect_faces, face_square, load_photo, to_gray
from runtime import DataError, atomic_write, pick_device
from tokenizer import encode_texts

OCCLUSION_GRID = 7  # Model A's map: 7 x 7 patches, the resolution of Model B's region grid at 224 px


def default_checkpoint(root="checkpoints"):
    """best.pt of the run with the highest val macro-F1, Model B runs before Model A runs."""
    candidates = []
    for best in Path(root).glob("*/best.pt"):
        args_file, log_file = best.with_name("args.json"), best.with_name("log.csv")
        if not (args_file.exists() and log_file.exists()):
            continue
        arch = json.loads(args_file.read_text()).get("model")
        with open(log_file, newline="") as f:
            f1 = max((float(row["val_macro_f1"]) for row in csv.DictReader(f)), default=-1.0)
        candidates.append((arch == "b", f1, str(best)))
    if not candidates:
        raise DataError(f"no checkpoint found under {root}/*/best.pt: train one "
                        "(`python train.py --model b`) or pass --checkpoint")
    return max(candidates)[2]


@torch.inference_mode()
def predict(model, images, input_ids, lengths, device):
    """uint8 images [N,S,S] + token ids [N,L] (0 = pad) -> class probabilities [N,C]."""
    width = max(int(lengths.max()), 1)
    model.eval()
    logits = model(input_ids[:, :width].long().to(device), lengths.long(),
                   images=images.to(device))
    return logits.float().softmax(1).cpu()


def find_faces(gray, size, detect, name):
    """-> boxes (x, y, w, h) largest first, the crop square (x, y, side) of each, and the crops
    uint8 (N, size, size). No face, or no detection asked for: the centre square alone."""
    boxes = detect_faces(gray) if detect else []
    if detect and not boxes:
        print(f"warning: no face found in {name}: using its centre square "
              "(right for an image that is already a face crop)", file=sys.stderr)
    squares = [face_square(box, gray.shape) for box in boxes] or [centre_square(gray.shape)]
    crops = torch.from_numpy(np.stack([crop_square(gray, square, size) for square in squares]))
    return boxes, squares, crops


def report(classes, boxes, squares, probs, as_json):
    """Print the largest face's label and probabilities, then one line (or entry) per other face."""
    faces = [{"box": list(box), "crop": [x, y, side, side], "label": classes[int(p.argmax())],
              "probabilities": dict(zip(classes, p.tolist()))}
             for box, (x, y, side), p in zip(boxes, squares, probs)]
    label, probabilities = classes[int(probs[0].argmax())], dict(zip(classes, probs[0].tolist()))
    if as_json:
        face = {key: faces[0][key] for key in ("box", "crop")} if faces else None
        print(json.dumps({"label": label, "probabilities": probabilities, "face": face, "faces": faces}))
        return
    print(label)
    for name, p in sorted(probabilities.items(), key=lambda item: -item[1]):
        print(f"  {name:9s} {p:6.1%} {'#' * round(p * 40)}")
    for face in faces[1:]:
        print(f"  another face at [x, y, w, h] = {face['box']}: {face['label']} "
              f"({face['probabilities'][face['label']]:.0%})")


@torch.inference_mode()
def explain_text(model, crop, input_ids, length, target, device):
    """Leave-one-token-out in one batch: row 0 is the sentence, row 1 + i drops token i.
    -> effect of each token on P(target) [n] (positive: it pushes towards target), and Model B's
    cross-attention on row 0 as a (g, g) map over the region grid (None for Model A)."""
    ids = input_ids[0, :length].long()  # (n,)
    keep = ~torch.eye(length, dtype=torch.bool)  # (n, n): row i keeps every token but the i-th
    batch = torch.zeros(length + 1, length, dtype=torch.long)  # (n + 1, n), 0 = pad
    batch[0], batch[1:, :length - 1] = ids, ids.expand(length, length)[keep].view(length, length - 1)
    lengths = torch.tensor([length] + [length - 1] * length)
    features = model.image_features(crop[None].to(device))  # the trunk runs once, not n + 1 times
    features = {name: value.expand(length + 1, *value.shape[1:]) for name, value in features.items()}
    logits, attention = model(batch.to(device), lengths, image_features=features, return_attention=True)
    probs = logits.float().softmax(1).cpu()  # (n + 1, C)
    effects = probs[0, target] - probs[1:, target]  # (n,)
    if attention is None:
        return effects, None
    regions = attention[0, :length].float().mean(0).cpu()  # (R,): the mean over the real tokens
    grid = int(round(regions.numel() ** 0.5))
    return effects, regions.view(grid, grid)


def occlusion_map(model, crop, input_ids, lengths, target, device):
    """Model A has no attention: hide each cell of a grid with a gray patch, all cells in one
    batch, and map the drop in P(target) -> (grid, grid)."""
    size, grid = crop.shape[-1], OCCLUSION_GRID
    edges = torch.linspace(0, size, grid + 1).round().long().tolist()
    images = crop.repeat(grid * grid + 1, 1, 1)  # (1 + grid^2, S, S); row 0 unoccluded
    for cell in range(grid * grid):
        row, col = divmod(cell, grid)
        images[1 + cell, edges[row]:edges[row + 1], edges[col]:edges[col + 1]] = 128
    probs = predict(model, images, input_ids.expand(len(images), -1), lengths.expand(len(images)), device)
    return (probs[0, target] - probs[1:, target]).view(grid, grid)


def draw_sentence(ax, text, offsets, effects, label):
    """The sentence with each token shaded by its leave-one-out effect, wrapped at 70 characters."""
    import matplotlib.pyplot as plt
    # The largest effect gets the strongest shade (never for less than 0.05: small effects stay
    # pale); the shades stop short of the colormap's dark ends, where black text is unreadable.
    cmap, scale = plt.get_cmap("RdBu_r"), max(float(effects.abs().max()), 0.05) / 0.35
    pieces, end = [], 0  # (string, effect or None): the gaps between tokens stay unshaded
    for (start, stop), effect in zip(offsets, effects.tolist()):
        pieces += [(text[end:start], None)] if start > end else []
        pieces.append((text[start:stop], effect))
        end = stop
    pieces += [(text[end:], None)] if end < len(text) else []  # past max_len: never read
    ax.axis("off")
    ax.set_title(f"each token shaded by how much P({label}) drops without it "
                 "(red: towards it, blue: away)", fontsize=10)
    line, column, previous = 0, 0, None
    for piece, effect in pieces:
        piece = "".join(ch if ord(ch) <= 0xFFFF else "?" for ch in piece)  # the default font has no emoji
        if column + len(piece) > 70 and piece.isspace():  # wrap at a gap between words
            line, column, previous = line + 1, 0, None
            continue
        style = dict(fontsize=13, family="monospace", va="top")
        if effect is not None:
            # pad 0: a padded box would paint over the neighbouring letters drawn before it
            style["bbox"] = dict(facecolor=cmap(0.5 + effect / scale), edgecolor="none", pad=0)
        if previous is None:
            previous = ax.text(0.0, 0.85 - 0.3 * line, piece, transform=ax.transAxes, **style)
        else:  # the next piece starts where the last one ended (matplotlib's "rainbow text")
            previous = ax.annotate(piece, xy=(1, 1), xycoords=previous, **style)
        column += len(piece)


def explain(path, model, tokenizer, info, photo, boxes, square, crop, text, probs, device):
    """One PNG: the photo with its face boxes, the crop with a heatmap, the shaded sentence, the bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes, target = info["classes"], int(probs.argmax())
    encoding = tokenizer.encode(text)
    input_ids, lengths = encode_texts(tokenizer, [text], model.cfg.max_len)
    effects, heat = explain_text(model, crop, input_ids, int(lengths[0]), target, device)
    how = "cross-attention of the words over the face regions"
    if heat is None:
        heat = occlusion_map(model, crop, input_ids, lengths, target, device)
        how = f"drop in P({classes[target]}) when a patch is grayed"
    fig = plt.figure(figsize=(13, 5.6))
    grid = fig.add_gridspec(2, 3, height_ratios=[4, 1], width_ratios=[1.2, 1, 1.1])
    ax = fig.add_subplot(grid[0, 0])
    step = -(-max(photo.shape[:2]) // 800)  # draw at most ~800 px: a 12 MP photo is slow to render
    height, width = photo.shape[:2]
    ax.imshow(photo[::step, ::step], cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0))
    for index, (x, y, w, h) in enumerate(boxes):
        ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, lw=2, color="lime" if index == 0 else "yellow"))
    x, y, side = square
    ax.add_patch(plt.Rectangle((x, y), side, side, fill=False, lw=1.5, ls="--", color="white"))
    ax.set_title(f"{len(boxes)} face(s); green: explained, dashed: crop" if boxes else
                 "no face found: the centre square (dashed)", fontsize=10)
    ax.axis("off")
    ax = fig.add_subplot(grid[0, 1])
    size = crop.shape[-1]
    ax.imshow(crop.numpy(), cmap="gray", vmin=0, vmax=255)
    # From 0, with a scale: a nearly even map must not look like a sharp one.
    shown = ax.imshow(heat.clamp(min=0).numpy(), cmap="jet", alpha=0.45, interpolation="bilinear", vmin=0,
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(f"what the model saw ({size} px)\nheat: {how}", fontsize=10)
    ax.axis("off")
    ax = fig.add_subplot(grid[0, 2])
    colors = ["tab:red" if index == target else "tab:gray" for index in range(len(classes))]
    ax.barh(classes[::-1], probs.tolist()[::-1], color=colors[::-1])
    ax.set_xlim(0, 1)
    ax.set_title(f"{classes[target]} ({float(probs[target]):.0%})", fontsize=12)
    draw_sentence(fig.add_subplot(grid[1, :]), text, encoding.offsets[:int(lengths[0])], effects,
                  classes[target])
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def show_examples(model, tokenizer, info, device, count, data_dir, out, seed):
    """A grid of random test pairs: face, sentence, true and predicted label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    check_compatible(info, load_tokenizer(data_dir), load_meta(data_dir))  # the ids must mean the same words
    test = load_split(data_dir, "test")
    picks = torch.randperm(len(test["labels"]), generator=torch.Generator().manual_seed(seed))[:count]
    texts = [tokenizer.decode(test["input_ids"][i, :test["lengths"][i]].tolist()) for i in picks]
    probs = predict(model, test["images"][picks], test["input_ids"][picks], test["lengths"][picks],
                    device)
    classes, cols = info["classes"], min(count, 4)
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, text, p in zip(axes.flat, picks, texts, probs):
        true, pred = classes[test["labels"][i]], classes[int(p.argmax())]
        ax.imshow(test["images"][i].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {true} | pred {pred} ({p.max():.2f})", fontsize=9,
                     color="green" if true == pred else "red")
        printable = "".join(ch for ch in text if ord(ch) <= 0xFFFF)  # the default font has no emoji
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
    if Path(path).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DataError(f"cannot write {path}: " + ("it is a folder" if Path(path).is_dir() else
                                                     f"{folder} is not a writable folder"))


def positive_int(value):
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", help="any image Pillow opens: a photo with faces, or a face crop")
    p.add_argument("--text", help="the sentence that goes with the face")
    p.add_argument("--checkpoint", default=None, help="default: the best run under checkpoints/")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--explain", metavar="PNG", help="write a picture of what the prediction rests on")
    p.add_argument("--no-detect", action="store_true", help="no face detection: use the centre square")
    p.add_argument("--examples", type=positive_int, metavar="N", help="draw N random test pairs")
    p.add_argument("--out", default="examples.png", help="where --examples writes its grid")
    p.add_argument("--data", default="data/processed", help="the prepared data --examples draws from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not args.examples and (args.image is None or args.text is None):
        p.error("give --image FILE and --text TEXT, or --examples N")
    return args


def run(args):
    if not args.examples and not args.text.strip():
        raise DataError("--text is empty: give the sentence that goes with the face")
    output = args.out if args.examples else args.explain
    if output:
        check_writable(output)
    device = pick_device(args.device)
    model, tokenizer, info = load_checkpoint(args.checkpoint or default_checkpoint(), device)
    if args.examples:
        show_examples(model, tokenizer, info, device, args.examples, args.data, args.out, args.seed)
        return 0
    input_ids, lengths = encode_texts(tokenizer, [args.text], model.cfg.max_len)
    if lengths[0] == 0:  # only characters the tokenizer drops (control characters)
        raise DataError("--text has no words the model can read: give the sentence that goes with the face")
    photo = load_photo(args.image)  # (H, W[, 3]), upright: boxes are in these pixels
    boxes, squares, crops = find_faces(to_gray(photo), info["image_size"], not args.no_detect, args.image)
    probs = predict(model, crops, input_ids.expand(len(crops), -1), lengths.expand(len(crops)), device)
    if args.explain:  # before any output: a failed write leaves stdout empty
        explain(args.explain, model, tokenizer, info, photo, boxes, squares[0], crops[0], args.text,
                probs[0], device)
    report(info["classes"], boxes, squares, probs, args.json)
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

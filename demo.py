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
import itertools
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
from images import face_crops, load_photo, to_gray
from runtime import DataError, atomic_write, pick_device, positive_int, script_parser
from tokenizer import encode_texts

# Model A's map: 7 x 7 patches, Model B's region grid at 224 px
OCCLUSION_GRID = 7
# the explain figure's sentence: characters a line, inches a line
WRAP = 80
LINE_INCHES = 0.27
MODALITY_NAMES = {"both": "fused", "image": "image-only", "text": "text-only"}


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


@torch.inference_mode()
def predict(model, images, input_ids, lengths, device, *, temperature):
    """uint8 images [N,S,S] + token ids [N,L] (0 = pad) -> calibrated probabilities [N,C]."""
    width = max(int(lengths.max()), 1)
    model.eval()
    logits = model(input_ids[:, :width].long().to(device), lengths.long(), images=images.to(device))
    return (logits.float() / temperature).softmax(1).cpu()


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


def pyplot():
    """matplotlib.pyplot, drawing to files: imported only for a figure (start-up time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@torch.inference_mode()
def explain_text(model, crop, input_ids, length, target, device, *, temperature):
    """Leave-one-token-out in one batch: row 0 is the sentence, row 1 + i drops token i.
    -> effect of each token on P(target) [n] (positive: it pushes towards target), and Model B's
    cross-attention on row 0 as a (g, g) map over the region grid (None without one)."""
    if length == 0 or not model.uses_text:
        return torch.zeros(0), None
    ids = input_ids[0, :length].long()  # (n,)
    keep = ~torch.eye(length, dtype=torch.bool)  # (n, n): all but token i
    batch = torch.zeros(length + 1, length, dtype=torch.long)  # (n + 1, n)
    batch[0] = ids
    batch[1:, :length - 1] = ids.expand(length, length)[keep].view(length, length - 1)
    lengths = torch.tensor([length] + [length - 1] * length)
    features = None
    if model.uses_image:
        # the trunk runs once, not n + 1 times
        features = model.image_features(crop[None].to(device))
        features = {name: value.expand(length + 1, *value.shape[1:]) for name, value in features.items()}
    logits, attention = model(batch.to(device), lengths, image_features=features, return_attention=True)
    probs = (logits.float() / temperature).softmax(1).cpu()  # (n + 1, C)
    effects = probs[0, target] - probs[1:, target]  # (n,)
    if attention is None:
        return effects, None
    regions = attention[0, :length].float().mean(0).cpu()  # (R,): mean over tokens
    grid = int(round(regions.numel() ** 0.5))
    return effects, regions.view(grid, grid)


def occlusion_map(model, crop, input_ids, lengths, target, device, *, temperature):
    """Hide each cell of a grid with a gray patch, all cells in one batch, and map the drop
    in P(target) -> (grid, grid). For models without attention over the regions."""
    size = crop.shape[-1]
    grid = OCCLUSION_GRID
    edges = torch.linspace(0, size, grid + 1).round().long().tolist()
    images = crop.repeat(grid * grid + 1, 1, 1)  # (1 + grid^2, S, S); row 0 whole
    for cell in range(grid * grid):
        row, col = divmod(cell, grid)
        images[1 + cell, edges[row]:edges[row + 1], edges[col]:edges[col + 1]] = BLANK_PIXEL
    count = len(images)
    probs = predict(model, images, input_ids.expand(count, -1), lengths.expand(count), device,
                    temperature=temperature)
    return (probs[0, target] - probs[1:, target]).view(grid, grid)


def sentence_lines(text, offsets, effects, cut):
    """The sentence wrapped at WRAP characters (inside a word only when it is longer than a
    line) -> lines of (string, style) runs; style: a token's effect, None for the gaps between
    tokens, "cut" for the bar where the model stopped reading, "past" for the text after it."""
    pieces = []
    end = 0
    for (start, stop), effect in zip(offsets, effects.tolist()):
        pieces += [(text[end:start], None), (text[start:stop], effect)]
        end = stop
    pieces += [(" |", "cut"), (text[end:], "past")] if cut else [(text[end:], None)]
    # the default font has no emoji: one "?" keeps the character count
    shown = "".join(ch if ord(ch) <= 0xFFFF else "?" for piece, _ in pieces for ch in piece)
    owners = [index for index, (piece, _) in enumerate(pieces) for _ in piece]
    lines = []
    start = 0
    # without dropping whitespace, the lines put together are `shown` again
    for line in textwrap.wrap(shown, WRAP, expand_tabs=False, drop_whitespace=False):
        stop = start + len(line)
        lines.append([("".join(shown[i] for i in run), pieces[owner][1])
                      for owner, run in itertools.groupby(range(start, stop), key=owners.__getitem__)])
        start = stop
    return lines


def draw_sentence(fig, ax, lines, effects, label, max_len, cut):
    """The wrapped sentence, each token shaded by its leave-one-out effect, with the shading's scale."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.transforms import ScaledTranslation
    ax.axis("off")
    title = f"each token shaded by how much P({label}) drops without it (red: towards it, blue: away)"
    cut_note = f"\ngray, after the red bar: past the model's {max_len} tokens, never read"
    ax.set_title(title + (cut_note if cut else ""), fontsize=10, loc="left")
    # The largest effect gets the strongest shade (never for less than 0.05: small effects stay
    # pale); the shades stop short of the colormap's dark ends, where black text is unreadable.
    limit = max(float(effects.abs().max()), 0.05)
    cmap = ListedColormap(plt.get_cmap("RdBu_r")(np.linspace(0.15, 0.85, 256)))
    norm = Normalize(-limit, limit)
    for row, line in enumerate(lines):
        previous = None
        for piece, style in line:
            # a line starts at its first word
            piece = piece if previous is not None else piece.lstrip()
            if not piece:
                continue
            color = "0.55" if style == "past" else "black"
            font = dict(fontsize=13, family="monospace", va="top", color=color)
            if style == "cut":
                font.update(color="red", weight="bold")
            elif isinstance(style, float):
                # pad 0: a padded box would paint over the neighbouring letters
                font["bbox"] = dict(facecolor=cmap(norm(style)), edgecolor="none", pad=0)
            if previous is None:
                shift = ScaledTranslation(0, -row * LINE_INCHES, fig.dpi_scale_trans)
                previous = ax.text(0.0, 1.0, piece, transform=ax.transAxes + shift, **font)
            else:
                # the next piece starts where the last one ended (matplotlib's "rainbow text")
                previous = ax.annotate(piece, xy=(1, 1), xycoords=previous, **font)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm, cmap), cax=ax.inset_axes([0.76, 1.04, 0.22, 0.06]),
                       orientation="horizontal")
    bar.set_label(f"P({label}) with - without the token", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def draw_heat(fig, ax, crop, heat, kind, label):
    """The crop under its heatmap, the grid it was measured on, and a labelled colour bar."""
    size = crop.shape[-1]
    ax.axis("off")
    if heat is None:
        ax.text(0.5, 0.5, "no heatmap: a text-only model\nhas no image branch", ha="center",
                transform=ax.transAxes)
        return
    ax.imshow(crop.numpy(), cmap="gray", vmin=0, vmax=255)
    grid = heat.shape[0]
    shown = heat.clamp(min=0)
    top = float(shown.max())
    if kind == "attention":
        title = f"cross-attention over the trunk's {grid}x{grid} regions"
        legend = f"share of the words' attention (even: 1/{grid * grid} = {1 / grid ** 2:.3f}, the bar)"
        # even attention sits mid-scale, not at the top as if it were sharp
        top = max(top, 2 / grid ** 2)
    else:
        title = f"occlusion: each of {grid}x{grid} patches grayed"
        legend = f"drop in P({label}); below 0 clipped to 0 (lowest {float(heat.min()):+.2g})"
    # From 0, with a scale: a nearly even map must not look like a sharp one.
    image = ax.imshow(shown.numpy(), cmap="jet", alpha=0.45, interpolation="bilinear", vmin=0,
                      vmax=top or 1e-6, extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    for edge in torch.linspace(0, size, grid + 1)[1:-1].tolist():
        ax.axhline(edge - 0.5, color="white", lw=0.6, alpha=0.7)
        ax.axvline(edge - 0.5, color="white", lw=0.6, alpha=0.7)
    bar = fig.colorbar(image, ax=ax, orientation="horizontal", fraction=0.05, pad=0.03)
    bar.set_label(legend, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if kind == "attention":
        bar.ax.axvline(1 / grid ** 2, color="black", lw=1.5)
    ax.set_title(f"what the model saw ({size} px)\n{title}", fontsize=10)


def draw_photo(ax, inputs, name, reads_image):
    """The photo with its face boxes and the crop square, or why there is none."""
    plt = pyplot()
    ax.axis("off")
    if inputs.photo is None:
        why = "no --image: a blank gray face" if reads_image else "a text-only model reads no image"
        ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=11, transform=ax.transAxes)
        return
    # draw at most ~800 px: a 12 MP photo is slow to render
    step = -(-max(inputs.photo.shape[:2]) // 800)
    height, width = inputs.photo.shape[:2]
    ax.imshow(inputs.photo[::step, ::step], cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0))
    for index, (x, y, w, h) in enumerate(inputs.boxes):
        ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, lw=2, color="yellow" if index else "lime"))
    x, y, side = inputs.squares[0]
    ax.add_patch(plt.Rectangle((x, y), side, side, fill=False, lw=1.5, ls="--", color="white"))
    found = f"{len(inputs.boxes)} face(s), green: explained" if inputs.boxes else "no face found"
    ax.set_title(f"{name}\n{found}; dashed: the crop", fontsize=10)


def explain(path, model, tokenizer, info, checkpoint, inputs, probs, device, name):
    """One PNG: the photo with its face boxes, the crop with a heatmap, the shaded sentence, the bars."""
    plt = pyplot()
    classes = info["classes"]
    target = int(probs.argmax())
    temperature = info["temperature"]
    cfg = model.cfg
    length = int(inputs.lengths[0])
    effects, heat = explain_text(model, inputs.crops[0], inputs.input_ids, length, target, device,
                                 temperature=temperature)
    kind = "attention" if heat is not None else "occlusion"
    if heat is None and model.uses_image:
        heat = occlusion_map(model, inputs.crops[0], inputs.input_ids, inputs.lengths, target, device,
                             temperature=temperature)
    lines = sentence_lines(inputs.text, tokenizer.encode(inputs.text).offsets[:length], effects,
                           inputs.truncated)
    sentence_inches = 0.8 + LINE_INCHES * len(lines)
    fig = plt.figure(figsize=(13, 5.2 + sentence_inches))
    grid = fig.add_gridspec(2, 3, height_ratios=[5.2, sentence_inches], width_ratios=[1.2, 1, 1.1])
    random_trunk = model.uses_image and not cfg.pretrained and not cfg.finetune
    mark = " [random trunk: not pretrained, not fine-tuned]" if random_trunk else ""
    fig.suptitle(f"Model {cfg.arch.upper()}, {MODALITY_NAMES[cfg.modality]}{mark}: {checkpoint}", fontsize=11)
    draw_photo(fig.add_subplot(grid[0, 0]), inputs, name, model.uses_image)
    draw_heat(fig, fig.add_subplot(grid[0, 1]), inputs.crops[0], heat, kind, classes[target])
    ax = fig.add_subplot(grid[0, 2])
    colors = ["tab:red" if index == target else "tab:gray" for index in range(len(classes))]
    ax.barh(classes[::-1], probs.tolist()[::-1], color=colors[::-1])
    ax.set_xlim(0, 1)
    ax.set_title(f"{classes[target]} ({float(probs[target]):.0%}; temperature {temperature:.2f})")
    ax = fig.add_subplot(grid[1, :])
    if length:
        draw_sentence(fig, ax, lines, effects, classes[target], cfg.max_len, inputs.truncated)
    else:
        ax.axis("off")
        why = "no --text: an empty sentence" if model.uses_text else "an image-only model reads no text"
        ax.set_title(why, fontsize=10, loc="left")
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
        explain(args.explain, model, tokenizer, info, checkpoint, inputs, probs[0], device,
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

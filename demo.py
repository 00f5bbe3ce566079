"""Predict the emotion of a face image plus a sentence with a trained checkpoint.

    python demo.py --image face.png --text "I can't stop smiling today"
    python demo.py --image face.jpg --text "so tired of this" --json
    python demo.py --examples 8 --out examples.png      # test pairs with predictions

The default checkpoint is the best Model B run under checkpoints/ (by val macro-F1),
else the best Model A run. The checkpoint alone is enough: it holds the weights, the
tokenizer, the class names and the raw image size; preprocessing lives in the model.
"""
import argparse
import csv
import json
import sys
import textwrap
from pathlib import Path

import torch

from data import DataError, atomic_write, encode_texts, load_split, pick_device
from images import read_image
from models import CheckpointError, load_checkpoint


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


def show_examples(model, tokenizer, info, device, count, data_dir, out, seed):
    """A grid of random test pairs: face, sentence, true and predicted label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", help="any image Pillow opens: color or gray, any size")
    p.add_argument("--text", help="the sentence that goes with the face")
    p.add_argument("--checkpoint", default=None, help="default: the best run under checkpoints/")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--examples", type=int, default=0, help="draw N random test pairs")
    p.add_argument("--out", default="examples.png")
    p.add_argument("--data", default="data/processed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not args.examples and (args.image is None or args.text is None):
        p.error("give --image FILE and --text TEXT, or --examples N")
    return args


def run(args):
    if not args.examples and not args.text.strip():
        raise DataError("--text is empty: give the sentence that goes with the face")
    device = pick_device(args.device)
    model, tokenizer, info = load_checkpoint(args.checkpoint or default_checkpoint(), device)
    if args.examples:
        show_examples(model, tokenizer, info, device, args.examples, args.data, args.out, args.seed)
        return 0
    image = torch.from_numpy(read_image(args.image, info["image_size"]))[None]  # (1, S, S)
    input_ids, lengths = encode_texts(tokenizer, [args.text], model.cfg.max_len)
    probs = predict(model, image, input_ids, lengths, device)[0].tolist()
    ranked = sorted(zip(info["classes"], probs), key=lambda item: -item[1])
    if args.json:
        print(json.dumps({"label": ranked[0][0], "probabilities": dict(zip(info["classes"], probs))}))
        return 0
    print(f"{ranked[0][0]}")
    for name, p in ranked:
        print(f"  {name:9s} {p:6.1%} {'#' * round(p * 40)}")
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

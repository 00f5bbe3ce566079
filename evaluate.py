"""Score a checkpoint on the fixed test (or val) pairs, in the reference's results format.

    python evaluate.py --checkpoint checkpoints/model_b/best.pt
    python evaluate.py --checkpoint checkpoints/model_a/best.pt --split val --ablate

Deterministic: the pairs were fixed by prepare_data.py and nothing is augmented, so the
same checkpoint gives the same numbers every time. Prints a per-class table, writes the
confusion matrix (CSV + PNG) next to the checkpoint and appends one row to the results CSV.
"""
import argparse
import csv
import io
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, \
    f1_score, precision_recall_fscore_support

from data import Batches, DataError, atomic_write, autocast, cached_features, load_meta, load_split, \
    load_tokenizer, pick_device
from models import CheckpointError, check_compatible, load_checkpoint

REFERENCE_COLUMNS = ["Experiment_ID", "Test_Accuracy", "Macro_Precision", "Macro_Recall",
                     "Macro_F1", "Final_Train_Accuracy", "Final_Val_Accuracy",
                     "Best_Val_Accuracy", "Cross_Attention", "Dropout", "Learning_Rate",
                     "Epochs", "Batch_Size", "Transformer_Layers", "Transformer_Heads",
                     "Optimizer", "Data_Augmentation"]
EXTRA_COLUMNS = ["Model", "Run", "Checkpoint_Epoch", "Split", "Weighted_F1", "Data_Source",
                 "Pretrained", "Finetuned", "Train_Seconds"]


def scores(labels, preds):
    """Accuracy and macro-F1, as training, validation and testing all report them."""
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0))}


@torch.no_grad()
def evaluate(model, batches, mixed_precision=nullcontext()):
    """Loss, accuracy, macro-F1 and the raw predictions of `model` over `batches`.
    The one metric function: train.py validates with it, evaluate.py tests with it."""
    model.eval()
    loss_sum, logits, labels = 0.0, [], []
    for batch in batches:
        with mixed_precision:
            out = model(batch["input_ids"], batch["lengths"], images=batch.get("images"),
                        image_features=batch.get("image_features")).float()
        loss_sum += F.cross_entropy(out, batch["labels"], reduction="sum").item()
        logits.append(out.cpu())
        labels.append(batch["labels"].cpu())
    logits, labels = torch.cat(logits), torch.cat(labels).numpy()
    preds = logits.argmax(1).numpy()
    return {"loss": loss_sum / len(labels), **scores(labels, preds), "preds": preds, "labels": labels}


def results_row(result, classes, info, checkpoint, split, meta):
    """One row of the results CSV: the reference's 17 columns, per-class scores, extras."""
    labels, preds, ids = result["labels"], result["preds"], range(len(classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=ids, average="macro", zero_division=0)
    _, _, weighted_f1, _ = precision_recall_fscore_support(
        labels, preds, labels=ids, average="weighted", zero_division=0)
    per_class = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    cfg, args, metrics = info["config"], info["args"] or {}, info["metrics"]
    is_b = cfg["arch"] == "b"
    row = {"Experiment_ID": f"{Path(checkpoint).parent.name}/{Path(checkpoint).stem}",
           "Test_Accuracy": result["accuracy"], "Macro_Precision": precision,
           "Macro_Recall": recall, "Macro_F1": f1,
           "Final_Train_Accuracy": metrics.get("train_accuracy", ""),
           "Final_Val_Accuracy": metrics.get("val_accuracy", ""),
           "Best_Val_Accuracy": metrics.get("best_val_accuracy", ""),
           "Cross_Attention": is_b and cfg["cross_attention"], "Dropout": cfg["dropout"],
           "Learning_Rate": args.get("lr", ""), "Epochs": args.get("epochs", ""),
           "Batch_Size": args.get("batch_size", ""),
           "Transformer_Layers": cfg["n_layers"] if is_b else "",
           "Transformer_Heads": cfg["n_heads"] if is_b else "", "Optimizer": "AdamW",
           "Data_Augmentation": not (args.get("no_flip", True) and args.get("no_redraw", True))}
    for name, p, r, f in zip(classes, *per_class[:3]):
        row.update({f"{name}_F1": f, f"{name}_Precision": p, f"{name}_Recall": r})
    row.update({"Model": cfg["arch"].upper(), "Run": Path(checkpoint).parent.name,
                "Checkpoint_Epoch": metrics.get("epoch", ""), "Split": split,
                "Weighted_F1": weighted_f1, "Data_Source": meta["sources"].get("kind", ""),
                "Pretrained": cfg["pretrained"], "Finetuned": cfg["finetune"],
                "Train_Seconds": metrics.get("train_seconds", "")})
    columns = REFERENCE_COLUMNS + [f"{name}_{score}" for name in classes
                                   for score in ("F1", "Precision", "Recall")] + EXTRA_COLUMNS
    return {k: round(float(row[k]), 6) if isinstance(row[k], (float, np.floating)) else row[k]
            for k in columns}  # plain numbers: 0.8319, not "83.19%"


def append_row(path, row):
    """Append to the results CSV atomically; refuse a file with other columns."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and old.splitlines()[0] != ",".join(row):
        raise DataError(f"{path} has other columns than this project writes: "
                         "pass --results NEW.csv")
    out = io.StringIO()
    writer = csv.DictWriter(out, list(row), lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerow(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(old + out.getvalue())


def print_results(path):
    """The results file so far, one line a row: the comparison across runs."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"{path}:\n  {'experiment':24s} {'split':5s} {'accuracy':>8s} {'macro-F1':>8s} "
          f"{'train s':>8s}")
    for row in rows:
        seconds = f"{float(row['Train_Seconds']):.0f}" if row["Train_Seconds"] else "-"
        print(f"  {row['Experiment_ID']:24s} {row['Split']:5s} {float(row['Test_Accuracy']):8.4f} "
              f"{float(row['Macro_F1']):8.4f} {seconds:>8s}")


def save_confusion(matrix, classes, stem):
    """Confusion matrix as CSV (rows: true, columns: predicted) and as an annotated PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = ["true\\predicted," + ",".join(classes)]
    lines += [f"{name}," + ",".join(map(str, counts)) for name, counts in zip(classes, matrix)]
    with atomic_write(f"{stem}.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, matrix[i, j], ha="center", va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    with atomic_write(f"{stem}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def ablations(model, split, features, batch_size, device, mixed_precision):
    """Scores with each modality removed: the text as an empty sequence, the image blank."""
    no_text = {**split, "input_ids": torch.zeros_like(split["input_ids"][:, :1]),
               "lengths": torch.zeros_like(split["lengths"])}
    blank = torch.full_like(split["images"][:1], 128)  # mid-gray: no face, no contrast
    model.eval()
    with torch.inference_mode():  # one blank image's features, shared by every pair: [1,N,...]
        blank_features = {k: v.cpu().unsqueeze(0).expand(1, len(split["labels"]), *v.shape[1:])
                          for k, v in model.image_features(blank.to(device)).items()}
    return {"no text": evaluate(model, Batches(no_text, batch_size, device, features=features),
                                mixed_precision),
            "no image": evaluate(model, Batches(split, batch_size, device, features=blank_features),
                                 mixed_precision)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="data/processed")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--results", default="test_results.csv")
    p.add_argument("--ablate", action="store_true", help="also score without text / image")
    p.add_argument("--cache-dir", default="data/cache")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def run(args):
    device = pick_device(args.device)
    model, tokenizer, info = load_checkpoint(args.checkpoint, device)
    meta = load_meta(args.data)
    check_compatible(info, load_tokenizer(args.data), meta)
    split = load_split(args.data, args.split)
    mixed_precision, _ = autocast(device, args.amp)
    features = None
    if not (args.no_cache or model.cfg.finetune):
        features, _ = cached_features(model, split["images"], args.cache_dir, device, flips=False)
    result = evaluate(model, Batches(split, args.batch_size, device, features=features),
                      mixed_precision)
    classes = info["classes"]
    print(f"{args.checkpoint} on {args.split} ({len(result['labels'])} pairs)")
    print(classification_report(result["labels"], result["preds"], labels=range(len(classes)),
                                target_names=classes, digits=4, zero_division=0))
    row = results_row(result, classes, info, args.checkpoint, args.split, meta)
    append_row(args.results, row)  # first: it refuses a foreign results file before any write
    stem = Path(args.checkpoint).with_suffix("")
    matrix = confusion_matrix(result["labels"], result["preds"], labels=range(len(classes)))
    save_confusion(matrix, classes, f"{stem}_{args.split}_confusion")
    print(f"accuracy {row['Test_Accuracy']:.4f} | macro-F1 {row['Macro_F1']:.4f} | "
          f"confusion matrix: {stem}_{args.split}_confusion.png")
    print_results(args.results)
    if args.ablate:
        scores = {"full model": result, **ablations(model, split, features, args.batch_size,
                                                   device, mixed_precision)}
        print(f"{'':12s} {'accuracy':>9s} {'macro-F1':>9s}")
        for name, score in scores.items():
            print(f"{name:12s} {score['accuracy']:9.4f} {score['macro_f1']:9.4f}")
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

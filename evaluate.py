"""Score a checkpoint on the fixed test (or val) pairs, in the reference's results format.

    python evaluate.py --checkpoint checkpoints/model_b/best.pt
    python evaluate.py --checkpoint checkpoints/model_a/best.pt --split val --ablate --tta

Deterministic: the pairs were fixed by prepare_data.py, nothing is augmented and the
bootstrap is seeded, so the same checkpoint gives the same numbers every time. Prints a
per-class table, 95 % intervals and the calibration error (with the temperature stored in
the checkpoint and without it), writes the confusion matrix (CSV + PNG) next to the
checkpoint and appends one row to the results CSV. By default the forward pass runs at the
precision the run was trained at (its --amp).
"""
import csv
import fcntl
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

import leaks
from checkpoints import CheckpointError, check_compatible, load_checkpoint
from data import Batches, cached_features, load_meta, load_split, load_tokenizer
from metrics import (ECE_BINS, RESAMPLES, ablations, bootstrap, calibration_error, evaluate, summarize,
                     temper)
from runtime import DataError, atomic_write, autocast, pick_device, positive_int, script_parser

REFERENCE_COLUMNS = ["Experiment_ID", "Test_Accuracy", "Macro_Precision", "Macro_Recall",
                     "Macro_F1", "Final_Train_Accuracy", "Final_Val_Accuracy",
                     "Best_Val_Accuracy", "Cross_Attention", "Dropout", "Learning_Rate",
                     "Epochs", "Batch_Size", "Transformer_Layers", "Transformer_Heads",
                     "Optimizer", "Data_Augmentation"]
EXTRA_COLUMNS = ["Model", "Modality", "Run", "Checkpoint_Epoch", "Split", "TTA",
                 "Accuracy_CI_Low", "Accuracy_CI_High", "Macro_F1_CI_Low", "Macro_F1_CI_High", "ECE",
                 "ECE_Uncalibrated", "Temperature", "Weighted_F1", "Data_Source", "Trunk", "Finetuned", "Train_Seconds",
                 "Leak_Fraction"]


def score(model, split, features, batch_size, device, mixed_precision, tta=False):
    """evaluate() over a whole split. `features`: the trunk cache, dicts of [V,N,...] (variant 1
    holds the mirrored images), or None to run the trunk. `tta` averages the probabilities of
    each image and of its mirror."""
    def one_view(variant):
        if features is None:
            # the trunk runs on the images, mirrored here for variant 1
            view = {**split, "images": split["images"].flip(-1)} if variant else split
            return evaluate(model, Batches(view, batch_size, device), mixed_precision)
        chosen = {k: v[variant:variant + 1] for k, v in features.items()}
        return evaluate(model, Batches(split, batch_size, device, features=chosen), mixed_precision)

    plain = one_view(0)
    if not tta:
        return plain
    mirrored = one_view(1)
    # log of the mean probability, as a logsumexp: exact where a probability underflows to 0
    both = torch.stack([plain["log_probs"], mirrored["log_probs"]])  # (2, N, C)
    return summarize(torch.logsumexp(both, dim=0) - math.log(2), torch.from_numpy(plain["labels"]))


def calibrate(result, temperature):
    """`result` (score()'s) with its probabilities softened or sharpened by the checkpoint's
    temperature. Under --tta the temperature, fitted on single views, divides the averaged
    log-probabilities: the predictions, and so every score but the ECE, stay as they were."""
    return summarize(temper(result["log_probs"], temperature), torch.from_numpy(result["labels"]))


def trunk_origin(cfg):
    """Where the trunk's weights started: imagenet, random, or the --trunk-from checkpoint."""
    if cfg.get("trunk_from"):
        return cfg["trunk_from"]
    return "imagenet" if cfg["pretrained"] else "random"


def results_row(result, stats, classes, info, args, meta):
    """One row of the results CSV: the reference's 17 columns, per-class scores, extras.
    `stats`: the bootstrap intervals, both ECEs, the temperature and the leak fraction."""
    labels = result["labels"]
    preds = result["preds"]
    ids = range(len(classes))
    precision, recall, _, _ = precision_recall_fscore_support(
        labels, preds, labels=ids, average="macro", zero_division=0)
    _, _, weighted_f1, _ = precision_recall_fscore_support(
        labels, preds, labels=ids, average="weighted", zero_division=0)
    per_class = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    cfg = info["config"]
    train_args = info["args"] or {}
    metrics = info["metrics"]
    checkpoint = Path(args.checkpoint)
    is_b = cfg["arch"] == "b"
    augmented = cfg.get("augment", False) or not (train_args.get("no_flip", True)
                                                  and train_args.get("no_redraw", True))
    row = {"Experiment_ID": f"{checkpoint.parent.name}/{checkpoint.stem}",
           "Test_Accuracy": result["accuracy"], "Macro_Precision": precision,
           "Macro_Recall": recall, "Macro_F1": result["macro_f1"],
           "Final_Train_Accuracy": metrics.get("train_accuracy", ""),
           "Final_Val_Accuracy": metrics.get("val_accuracy", ""),
           "Best_Val_Accuracy": metrics.get("best_val_accuracy", ""),
           "Cross_Attention": is_b and cfg["cross_attention"], "Dropout": cfg["dropout"],
           "Learning_Rate": train_args.get("lr", ""), "Epochs": train_args.get("epochs", ""),
           "Batch_Size": train_args.get("batch_size", ""),
           "Transformer_Layers": cfg["n_layers"] if is_b else "",
           "Transformer_Heads": cfg["n_heads"] if is_b else "", "Optimizer": "AdamW",
           "Data_Augmentation": augmented}
    for name, p, r, f in zip(classes, *per_class[:3]):
        row.update({f"{name}_F1": f, f"{name}_Precision": p, f"{name}_Recall": r})
    row.update({"Model": cfg["arch"].upper(), "Modality": cfg.get("modality", "both"),
                "Run": checkpoint.parent.name, "Checkpoint_Epoch": metrics.get("epoch", ""),
                "Split": args.split, "TTA": args.tta,
                "Accuracy_CI_Low": stats["accuracy"][0], "Accuracy_CI_High": stats["accuracy"][1],
                "Macro_F1_CI_Low": stats["macro_f1"][0], "Macro_F1_CI_High": stats["macro_f1"][1],
                "ECE": stats["ece"], "ECE_Uncalibrated": stats["ece_uncalibrated"],
                "Temperature": stats["temperature"], "Weighted_F1": weighted_f1, "Data_Source": meta["sources"].get("kind", ""),
                "Trunk": trunk_origin(cfg), "Finetuned": cfg["finetune"],
                "Train_Seconds": metrics.get("train_seconds", ""),
                "Leak_Fraction": "" if stats["leak_fraction"] is None else stats["leak_fraction"]})
    columns = REFERENCE_COLUMNS + [f"{name}_{kind}" for name in classes
                                   for kind in ("F1", "Precision", "Recall")] + EXTRA_COLUMNS
    # plain numbers: 0.8319, not "83.19%"
    return {k: round(float(row[k]), 6) if isinstance(row[k], (float, np.floating)) else row[k]
            for k in columns}


def append_row(path, row):
    """Append `row` to the results CSV, replacing the file atomically. A file written before a
    column existed gains it (empty in its older rows); one with columns this project never
    writes is refused. Evaluations that finish together (a sweep, two shells) take turns:
    the read, change and replace hold an exclusive lock, without which the later replace
    would drop the earlier row without a word."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A lock file of its own: the CSV is a new file after every replace, so a lock on it
        # would be a lock on a file the next evaluation no longer opens.
        with open(path.with_name(f"{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with atomic_write(path) as tmp:
                tmp.write_text(appended(path, row))
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}; pass --results NEW.csv") from None


def appended(path, row):
    """The text of the results CSV at `path` with `row` added."""
    old = path.read_text() if path.exists() else ""
    columns = list(row)
    old_columns = next(csv.reader(io.StringIO(old)), [])
    if not set(old_columns) <= set(columns):
        raise DataError(f"{path} has other columns than this project writes: "
                        "pass --results NEW.csv")
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    if old_columns == columns:
        out.write(old)
    else:
        # a new file, or one from before some column existed: written again under this header
        writer.writeheader()
        writer.writerows(csv.DictReader(io.StringIO(old)))
    writer.writerow(row)
    return out.getvalue()


def number(row, column, spec):
    """A results cell formatted, or '-' where an older row has none."""
    return format(float(row[column]), spec) if row.get(column) else "-"


def print_results(path):
    """The results file so far, one line a row: the comparison across runs."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"{path}:\n  {'experiment':24s} {'split':5s} {'modality':8s} {'tta':3s} "
          f"{'accuracy [95 % CI]':>24s} {'macro-F1':>8s} {'ECE':>6s} {'uncal.':>6s} {'T':>5s} "
          f"{'train s':>8s}")
    for row in rows:
        accuracy = (f"{float(row['Test_Accuracy']):.4f} [{float(row['Accuracy_CI_Low']):.4f}, "
                    f"{float(row['Accuracy_CI_High']):.4f}]")
        tta = "yes" if row["TTA"] == "True" else "no"
        print(f"  {row['Experiment_ID']:24s} {row['Split']:5s} {row['Modality']:8s} {tta:3s} "
              f"{accuracy:>24s} {float(row['Macro_F1']):8.4f} {number(row, 'ECE', '6.4f'):>6s} "
              f"{number(row, 'ECE_Uncalibrated', '6.4f'):>6s} {number(row, 'Temperature', '5.2f'):>5s} "
              f"{number(row, 'Train_Seconds', '.0f'):>8s}")


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
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, matrix[i, j], ha="center", va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    with atomic_write(f"{stem}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def print_ablations(rows, classes, text_classes):
    """Accuracy and macro-F1 of each row, the accuracy on the classes that have texts, and the
    recall of each class that has none (Disgust, Neutral): only the face can carry those."""
    text_ids = [i for i, name in enumerate(classes) if name in text_classes]
    textless = [i for i, name in enumerate(classes) if name not in text_classes]
    print(f"{'':14s} {'accuracy':>9s} {'macro-F1':>9s} {'text classes':>13s}"
          + "".join(f" {classes[i] + ' recall':>15s}" for i in textless))
    for name, result in rows.items():
        on_text = np.isin(result["labels"], text_ids)
        text_accuracy = (result["labels"][on_text] == result["preds"][on_text]).mean()
        print(f"{name:14s} {result['accuracy']:9.4f} {result['macro_f1']:9.4f} {text_accuracy:13.4f}"
              + "".join(f" {result['recall'][i]:15.4f}" for i in textless))


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a train.py checkpoint, e.g. checkpoints/model_b/best.pt")
    p.add_argument("--data", default="data/processed",
                   help="the prepared data (prepare_data.py --out) the model was trained on")
    p.add_argument("--split", choices=["test", "val"], default="test", help="the pairs to score")
    p.add_argument("--results", default="test_results.csv",
                   help="the results CSV: one row is appended per evaluation")
    p.add_argument("--ablate", action="store_true",
                   help="also score with the text emptied or shuffled, and the image blanked or shuffled")
    p.add_argument("--tta", action="store_true",
                   help="average the probabilities of each image and its mirror")
    p.add_argument("--cache-dir", default="data/cache",
                   help="where the frozen trunk's features are kept (shared with train.py)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the frozen trunk on every image instead of reading the feature cache")
    p.add_argument("--batch-size", type=positive_int, default=256, help="pairs per forward pass")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=None,
                   help="mixed precision: auto is bf16 where the GPU or CPU has it natively, fp16 on older "
                        "GPUs, off on other CPUs; None: the run's own train.py --amp (auto if it has none)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    return p.parse_args(argv)


def run_amp(flag, info):
    """The --amp to evaluate with: the flag when given, else the one the run trained with, so
    a run trained in fp32 is not tested on bf16 features (older checkpoints: auto)."""
    if flag is not None:
        return flag
    return (info["args"] or {}).get("amp", "auto")


def run(args):
    device = pick_device(args.device)
    model, tokenizer, info = load_checkpoint(args.checkpoint, device)
    meta = load_meta(args.data)
    check_compatible(info, load_tokenizer(args.data), meta)
    split = load_split(args.data, args.split)
    amp = run_amp(args.amp, info)
    mixed_precision, amp_dtype = autocast(device, amp)
    # a text-only model has no trunk; it ignores the images it is served
    features = None
    if model.cacheable and not args.no_cache:
        # --tta reads the mirrors from the cache too (variant 1)
        features, _ = cached_features(model, split["images"], args.cache_dir, device, flips=args.tta,
                                      amp=amp)

    def scored(pairs, pair_features):
        return score(model, pairs, pair_features, args.batch_size, device, mixed_precision, args.tta)

    uncalibrated = scored(split, features)
    temperature = float(info["temperature"])
    result = calibrate(uncalibrated, temperature)
    classes = info["classes"]
    stats = {**bootstrap(result["labels"], result["preds"], len(classes)),
             "ece": calibration_error(result["log_probs"], result["labels"]),
             "ece_uncalibrated": calibration_error(uncalibrated["log_probs"], uncalibrated["labels"]),
             "temperature": temperature,
             "leak_fraction": leaks.evaluated_fraction(meta.get("leaks"), args.split, len(split["labels"]))}
    mirrored = ", each image averaged with its mirror" if args.tta else ""
    precision = str(amp_dtype).replace("torch.", "") if amp_dtype else "off"
    print(f"{args.checkpoint} on {args.split} ({len(result['labels'])} pairs{mirrored}) | amp {precision}")
    print(classification_report(result["labels"], result["preds"], labels=range(len(classes)),
                                target_names=classes, digits=4, zero_division=0))
    if stats["leak_fraction"]:
        print(f"warning: {stats['leak_fraction']:.1%} of the {args.split} faces have a near-copy in an "
              "earlier split (meta.json 'leaks'): this score is inflated; prepare_data.py --dedupe drops them")
    row = results_row(result, stats, classes, info, args, meta)
    # first: it refuses a foreign results file before any write
    append_row(args.results, row)
    stem = Path(args.checkpoint).with_suffix("")
    matrix = confusion_matrix(result["labels"], result["preds"], labels=range(len(classes)))
    save_confusion(matrix, classes, f"{stem}_{args.split}_confusion")
    print(f"accuracy {row['Test_Accuracy']:.4f} [{row['Accuracy_CI_Low']:.4f}, "
          f"{row['Accuracy_CI_High']:.4f}] | macro-F1 {row['Macro_F1']:.4f} "
          f"[{row['Macro_F1_CI_Low']:.4f}, {row['Macro_F1_CI_High']:.4f}] (95 % bootstrap "
          f"intervals, {RESAMPLES} resamples) | ECE {row['ECE']:.4f} at temperature "
          f"{temperature:.3f}, {row['ECE_Uncalibrated']:.4f} uncalibrated ({ECE_BINS} bins)")
    print(f"confusion matrix: {stem}_{args.split}_confusion.png")
    print_results(args.results)
    if args.ablate:
        rows = {"full model": result, **ablations(model, split, features, scored)}
        print(f"\nablation on {args.split}:")
        print_ablations(rows, classes, set(meta["text_to_class"].values()))
        if model.cfg.modality != "both":
            missing = "text" if model.cfg.modality == "image" else "image"
            print(f"(a single-modality model, {model.cfg.modality} only: the rows that take away "
                  f"the {missing} do not apply)")
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

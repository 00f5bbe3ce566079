"""The results CSV: one row per evaluation in the reference's format, appended under a lock,
and the comparison across runs printed from it.

    row = results_row(result, stats, classes, info, "checkpoints/model_b/best.pt", "test", False, meta)
    row = ensemble_row([row_a, row_b, row_c])     # an ensemble's one row, named for its members
    append_row("test_results.csv", row)
    print_results("test_results.csv")

The reference's 17 columns first (Experiment_ID, Test_Accuracy, ...), then per-class F1,
precision and recall, then this project's extras; plain numbers (0.8319, not "83.19%").
evaluate.py computes what goes in a row (metrics.py's scores); this module only lays it out.
"""
import csv
import fcntl
import io
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from runtime import DataError, atomic_write

REFERENCE_COLUMNS = ["Experiment_ID", "Test_Accuracy", "Macro_Precision", "Macro_Recall",
                     "Macro_F1", "Final_Train_Accuracy", "Final_Val_Accuracy",
                     "Best_Val_Accuracy", "Cross_Attention", "Dropout", "Learning_Rate",
                     "Epochs", "Batch_Size", "Transformer_Layers", "Transformer_Heads",
                     "Optimizer", "Data_Augmentation"]
EXTRA_COLUMNS = ["Model", "Modality", "Run", "Checkpoint_Epoch", "Split", "TTA",
                 "Accuracy_CI_Low", "Accuracy_CI_High", "Macro_F1_CI_Low", "Macro_F1_CI_High", "ECE",
                 "ECE_Uncalibrated", "Temperature", "Weighted_F1", "Data_Source", "Trunk", "Finetuned", "Train_Seconds",
                 "Leak_Fraction", "Members", "Classes_Averaged"]


def trunk_origin(cfg):
    """Where the trunk's weights started: imagenet, random, or the --trunk-from checkpoint."""
    if cfg.get("trunk_from"):
        return cfg["trunk_from"]
    return "imagenet" if cfg["pretrained"] else "random"


def results_row(result, stats, classes, info, checkpoint, split, tta, meta):
    """One row of the results CSV: the reference's 17 columns, per-class scores, extras.
    `stats`: the bootstrap intervals, both ECEs, the temperature, the leak fraction and the
    class ids the macro scores average (result["macro_f1"] is over the same)."""
    labels = result["labels"]
    preds = result["preds"]
    ids = range(len(classes))
    precision, recall, _, _ = precision_recall_fscore_support(
        labels, preds, labels=stats["averaged"], average="macro", zero_division=0)
    _, _, weighted_f1, _ = precision_recall_fscore_support(
        labels, preds, labels=ids, average="weighted", zero_division=0)
    per_class = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    cfg = info["config"]
    train_args = info["args"] or {}
    metrics = info["metrics"]
    checkpoint = Path(checkpoint)
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
                "Split": split, "TTA": tta or "no",
                "Accuracy_CI_Low": stats["accuracy"][0], "Accuracy_CI_High": stats["accuracy"][1],
                "Macro_F1_CI_Low": stats["macro_f1"][0], "Macro_F1_CI_High": stats["macro_f1"][1],
                "ECE": stats["ece"], "ECE_Uncalibrated": stats["ece_uncalibrated"],
                "Temperature": stats["temperature"], "Weighted_F1": weighted_f1, "Data_Source": meta["sources"].get("kind", ""),
                "Trunk": trunk_origin(cfg), "Finetuned": cfg["finetune"],
                "Train_Seconds": metrics.get("train_seconds", ""),
                "Leak_Fraction": "" if stats["leak_fraction"] is None else stats["leak_fraction"],
                "Members": 1, "Classes_Averaged": len(stats["averaged"])})
    columns = REFERENCE_COLUMNS + [f"{name}_{kind}" for name in classes
                                   for kind in ("F1", "Precision", "Recall")] + EXTRA_COLUMNS
    # plain numbers: 0.8319, not "83.19%"
    return {k: round(float(row[k]), 6) if isinstance(row[k], (float, np.floating)) else row[k]
            for k in columns}


def ensemble_row(rows):
    """The members' rows (the same scores, each with its own run's columns) -> the ensemble's
    one row: named for every member, and a run's column kept where all members agree."""
    merged = {column: values[0] if len(set(map(str, values))) == 1 else ""
              for column, values in ((column, [row[column] for row in rows]) for column in rows[0])}
    return {**merged, "Experiment_ID": "+".join(row["Experiment_ID"] for row in rows),
            "Run": "+".join(row["Run"] for row in rows), "Members": len(rows)}


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
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else ""
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: pass --results NEW.csv") from None
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


def cell(row, column, spec=None):
    """A results cell, formatted by `spec` where it is a number; as it is where it is text or
    not a number (the reference writes "83.19%"); '-' where the row has none (a row of an
    older version, a short row)."""
    text = (row.get(column) or "").strip()
    if spec is not None:
        try:
            return format(float(text), spec)
        except ValueError:
            pass
    return text or "-"


def print_results(path):
    """The results file so far, one line per row: the comparison across runs. It reads the
    rows of older versions and of the reference as well, which share its columns and its name."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    print(f"{path}:\n  {'experiment':24s} {'split':5s} {'modality':8s} {'tta':6s} "
          f"{'accuracy [95 % CI]':>24s} {'macro-F1':>8s} {'ECE':>6s} {'uncal.':>6s} {'T':>5s} "
          f"{'train s':>8s}")
    for row in rows:
        accuracy = cell(row, "Test_Accuracy", ".4f")
        if row.get("Accuracy_CI_Low"):
            accuracy += f" [{cell(row, 'Accuracy_CI_Low', '.4f')}, {cell(row, 'Accuracy_CI_High', '.4f')}]"
        # before --tta crops the column was a bool
        tta = {"True": "mirror", "False": "no"}.get(row.get("TTA"), cell(row, "TTA"))
        print(f"  {cell(row, 'Experiment_ID'):24s} {cell(row, 'Split'):5s} {cell(row, 'Modality'):8s} {tta:6s} "
              f"{accuracy:>24s} {cell(row, 'Macro_F1', '8.4f'):>8s} {cell(row, 'ECE', '6.4f'):>6s} "
              f"{cell(row, 'ECE_Uncalibrated', '6.4f'):>6s} {cell(row, 'Temperature', '5.2f'):>5s} "
              f"{cell(row, 'Train_Seconds', '.0f'):>8s}")

"""Score a checkpoint (or an ensemble of several) on the fixed test (or val) pairs, or on a
CSV of your own labelled pairs, in the reference's results format.

    python evaluate.py --checkpoint checkpoints/model_b/best.pt
    python evaluate.py --checkpoint checkpoints/model_a/best.pt --split val --ablate --tta
    python evaluate.py --checkpoint runs/s0/best.pt runs/s1/best.pt runs/s2/best.pt   # one ensemble row
    python evaluate.py --checkpoint checkpoints/model_b/best.pt --pairs mine.csv      # image,text,label

The score is deterministic: prepare_data.py fixed the pairs, nothing is augmented and the
bootstrap is seeded, so the same checkpoint gives the same numbers every time. The script
prints a table with one line per class, 95 % intervals and the calibration error (with the
temperature stored in the checkpoint and without it), writes the confusion matrix (CSV and
PNG) next to the checkpoint, and appends one row to the results CSV. By default the forward
pass runs at the precision the run was trained at (its --amp).

Several checkpoints of one data set (one tokenizer, one class list) are an ensemble: each
member's calibrated probabilities are averaged, and the row is named for all of them.
--pairs reads a CSV with the columns image,text,label (the label is a class name, photo paths
are relative to the CSV, and image or text may be empty): the largest face in each photo is
found and cropped as demo.py does, and the pairs are scored like a prepared split. A row
whose photo cannot be read is left out, with a warning that counts such rows. The macro
scores of these pairs average only the classes in their labels (a set of Happy and Sad faces
is not marked down for the five classes it lacks); the row's Classes_Averaged says how many.
"""
import csv
import fcntl
import hashlib
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from prep import leaks
from models import CheckpointError, check_compatible
from data import Batches, cached_features, load_meta, load_split, load_tokenizer
from metrics import (ECE_BINS, RESAMPLES, ablations, bootstrap, calibration_error, evaluate, scores,
                     summarize, temper)
from recognizer import LABELLED, EmotionRecognizer, read_pairs
from runtime import DataError, atomic_write, autocast, pick_device, positive_int, script_parser

# the longest file name that ext4, XFS and most other file systems take, in bytes
NAME_MAX = 255


def score(model, split, features, batch_size, device, mixed_precision, tta=False):
    """Run evaluate() over a whole split. `features` is the trunk cache (a dict of [V, N, ...]
    tensors, where variant 1 holds the mirrored images), or None to run the trunk. With `tta`
    the probabilities of each image and of its mirror are averaged."""
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
    return mean_of([plain, one_view(1)])


def mean_of(results):
    """score()'s results of the same pairs (views of them, or ensemble members) -> the result of
    their mean probabilities. The log of the mean is computed as a logsumexp, which stays exact
    where a probability underflows to 0. A single result is returned unchanged."""
    if len(results) == 1:
        return results[0]
    stacked = torch.stack([result["log_probs"] for result in results])  # (V, N, C)
    return summarize(torch.logsumexp(stacked, dim=0) - math.log(len(results)),
                     torch.from_numpy(results[0]["labels"]))


def averaged_over(result, averaged):
    """`result` with its macro-F1 recomputed over the class ids in `averaged` alone (metrics.scores)."""
    return {**result, **scores(result["labels"], result["preds"], result["log_probs"].shape[1], averaged)}


def calibrate(result, temperature):
    """`result` (from score()) with its probabilities softened or sharpened by the checkpoint's
    temperature. Under --tta the temperature, which was fitted on single views, divides the
    averaged log-probabilities: the predictions, and so every score except the ECE, stay as
    they were."""
    return summarize(temper(result["log_probs"], temperature), torch.from_numpy(result["labels"]))


def save_confusion(matrix, classes, stem):
    """Write the confusion matrix as a CSV (rows: true, columns: predicted) and as an annotated PNG."""
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
    """Print the accuracy and macro-F1 of each row, the accuracy on the classes that have texts,
    and the recall of each class that has none (Disgust, Neutral): only the face can carry those."""
    text_ids = [i for i, name in enumerate(classes) if name in text_classes]
    textless = [i for i, name in enumerate(classes) if name not in text_classes]
    print(f"{'':14s} {'accuracy':>9s} {'macro-F1':>9s} {'text classes':>13s}"
          + "".join(f" {classes[i] + ' recall':>15s}" for i in textless))
    for name, result in rows.items():
        on_text = np.isin(result["labels"], text_ids)
        text_accuracy = (result["labels"][on_text] == result["preds"][on_text]).mean()
        print(f"{name:14s} {result['accuracy']:9.4f} {result['macro_f1']:9.4f} {text_accuracy:13.4f}"
              + "".join(f" {result['recall'][i]:15.4f}" for i in textless))


# ---- the results CSV ---------------------------------------------------------------
# One row per evaluation in the reference's format, appended under a lock, and the comparison
# across runs printed from it. The reference's 17 columns come first (Experiment_ID,
# Test_Accuracy, ...), then the F1, precision and recall of each class, then this project's
# extras. Numbers are plain (0.8319, not "83.19%"). run() computes what goes in a row; the
# functions below only lay it out.

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
    """One row of the results CSV: the reference's 17 columns, the scores of each class, and
    this project's extras. `stats` holds the bootstrap intervals, both ECEs, the temperature,
    the leak fraction and the class ids that the macro scores average (result["macro_f1"]
    averages the same ones)."""
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
    # training flips the faces and draws new sentences every epoch (older runs could turn both off)
    augmented = cfg.get("augment", False) or not (train_args.get("no_flip", False)
                                                  and train_args.get("no_redraw", False))
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
                "Split": split, "TTA": "mirror" if tta else "no",
                "Accuracy_CI_Low": stats["accuracy"][0], "Accuracy_CI_High": stats["accuracy"][1],
                "Macro_F1_CI_Low": stats["macro_f1"][0], "Macro_F1_CI_High": stats["macro_f1"][1],
                "ECE": stats["ece"], "ECE_Uncalibrated": stats["ece_uncalibrated"],
                "Temperature": stats["temperature"], "Weighted_F1": weighted_f1,
                "Data_Source": meta["sources"].get("kind", ""),
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
    single row. It is named for every member, and it keeps a run's column where all members
    agree on it."""
    merged = {column: values[0] if len(set(map(str, values))) == 1 else ""
              for column, values in ((column, [row[column] for row in rows]) for column in rows[0])}
    return {**merged, "Experiment_ID": "+".join(row["Experiment_ID"] for row in rows),
            "Run": "+".join(row["Run"] for row in rows), "Members": len(rows)}


def append_row(path, row):
    """Append `row` to the results CSV, replacing the file atomically. A file written before a
    column existed gains it (empty in its older rows); one with columns this project never
    writes is refused. Evaluations that finish together (a sweep, two shells) take turns:
    the read, the change and the replace hold an exclusive lock, without which the later
    replace would silently drop the earlier row."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The lock is a file of its own: the CSV is a new file after every replace, so a lock on
        # it would be a lock on a file that the next evaluation no longer opens.
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
    """A results cell as text: formatted by `spec` where it holds a number, as it is where it
    holds text (the reference writes "83.19%"), and '-' where the row has no such cell (a row
    from an older version, or a short row)."""
    text = (row.get(column) or "").strip()
    if spec is not None:
        try:
            return format(float(text), spec)
        except ValueError:
            pass
    return text or "-"


def print_results(path):
    """Print the results file so far, one line per row: the comparison across runs. It also
    reads the rows that older versions and the reference wrote, which share its columns and
    its name."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    print(f"{path}:\n  {'experiment':24s} {'split':5s} {'modality':8s} {'tta':6s} "
          f"{'accuracy [95 % CI]':>24s} {'macro-F1':>8s} {'ECE':>6s} {'uncal.':>6s} {'T':>5s} "
          f"{'train s':>8s}")
    for row in rows:
        accuracy = cell(row, "Test_Accuracy", ".4f")
        if row.get("Accuracy_CI_Low"):
            accuracy += f" [{cell(row, 'Accuracy_CI_Low', '.4f')}, {cell(row, 'Accuracy_CI_High', '.4f')}]"
        # older versions wrote a bool
        tta = {"True": "mirror", "False": "no"}.get(row.get("TTA"), cell(row, "TTA"))
        print(f"  {cell(row, 'Experiment_ID'):24s} {cell(row, 'Split'):5s} {cell(row, 'Modality'):8s} {tta:6s} "
              f"{accuracy:>24s} {cell(row, 'Macro_F1', '8.4f'):>8s} {cell(row, 'ECE', '6.4f'):>6s} "
              f"{cell(row, 'ECE_Uncalibrated', '6.4f'):>6s} {cell(row, 'Temperature', '5.2f'):>5s} "
              f"{cell(row, 'Train_Seconds', '.0f'):>8s}")


# ---- the command line --------------------------------------------------------------

def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="PATH",
                   help="a train.py checkpoint, e.g. checkpoints/model_b/best.pt, or several trained on one "
                        "data set: an ensemble that averages their calibrated probabilities, scored as one row")
    p.add_argument("--data", default="data/processed",
                   help="the prepared data (prepare_data.py --out) the model was trained on")
    p.add_argument("--split", choices=["test", "val"], default="test", help="the pairs to score")
    p.add_argument("--pairs", metavar="CSV", help="score your own labelled pairs instead of --data: a CSV "
                   "with the columns image,text,label (the label is a class name); photo paths are relative "
                   "to the CSV")
    p.add_argument("--no-detect", action="store_true",
                   help="with --pairs: do not look for faces; the centre square of each photo is its face")
    p.add_argument("--results", default="test_results.csv",
                   help="the results CSV: one row is appended per evaluation")
    p.add_argument("--ablate", action="store_true",
                   help="also score with the text emptied or shuffled, and the image blanked or shuffled")
    p.add_argument("--tta", action="store_true", help="average the probabilities of each face and its mirror")
    p.add_argument("--cache-dir", default="data/cache",
                   help="where the frozen trunk's features are kept (shared with train.py)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the frozen trunk on every image instead of reading the feature cache")
    p.add_argument("--batch-size", type=positive_int, default=256, help="pairs per forward pass")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=None,
                   help="mixed precision: auto is bf16 where the GPU or CPU has it natively, fp16 on older "
                        "GPUs, and off on other CPUs; by default, the train.py --amp of the run (auto for a "
                        "run that recorded none)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    return p.parse_args(argv)


def run_amp(flag, info):
    """The --amp to evaluate with: the flag when given, else the one the run trained with, so
    a run trained in fp32 is not tested on bf16 features (auto for older checkpoints)."""
    if flag is not None:
        return flag
    return (info["args"] or {}).get("amp", "auto")


def labelled_split(pairs, recognizer, path):
    """A pairs CSV's rows -> a split in the form load_split gives: the largest face of each
    photo, cropped as the demo crops it (or the blank face), the ids of its sentence, and its
    label. Rows that cannot be read are left out and counted in one warning; an unknown label
    is a DataError. Only the face crop and the ids are kept: a decoded phone photo takes 36 MB,
    and a thousand of them take 36 GB."""
    index = {name.lower(): i for i, name in enumerate(recognizer.classes)}
    faces = []
    input_ids = []
    lengths = []
    labels = []
    dropped = []
    for pair in pairs:
        label = index.get((pair.label or "").lower())
        if label is None:
            raise DataError(f"{path}: line {pair.line}: the label {pair.label or ''!r} is not one of the "
                            f"checkpoint's classes ({', '.join(recognizer.classes)})")
        try:
            prepared = recognizer.prepare(pair.path, pair.text)
        except DataError as err:
            dropped.append(f"line {pair.line}: {err}")
            continue
        # a copy: a slice would keep every face of a group photo in memory
        faces.append(prepared.crops[0].clone())
        input_ids.append(prepared.input_ids)
        lengths.append(prepared.lengths)
        labels.append(label)
    if dropped:
        print(f"warning: {len(dropped)} of {len(pairs)} rows left out of the score, first {dropped[0]}")
    if not faces:
        raise DataError(f"{path}: no pair to score")
    return {"images": torch.stack(faces), "labels": torch.tensor(labels),
            "input_ids": torch.cat(input_ids), "lengths": torch.cat(lengths)}


@dataclass
class Scored:
    """One checkpoint's pass over the split, and how it scores changed pairs (--ablate)."""
    model: object
    features: dict | None  # the trunk cache, or None
    again: object          # (pairs, features) -> calibrated result
    uncalibrated: dict
    calibrated: dict
    precision: str


def score_member(model, info, split, args, device, cache):
    """Score one checkpoint at its run's precision, reading the feature cache where `cache` is true."""
    amp = run_amp(args.amp, info)
    mixed_precision, amp_dtype = autocast(device, amp)
    # a text-only model has no trunk; it ignores the images it is served
    features = None
    if cache and model.cacheable and not args.no_cache:
        # --tta reads the mirrors from the cache too (variant 1)
        features, _ = cached_features(model, split["images"], args.cache_dir, device, flips=bool(args.tta),
                                      amp=amp)
    temperature = float(info["temperature"])

    def uncalibrated(pairs, pair_features):
        return score(model, pairs, pair_features, args.batch_size, device, mixed_precision, args.tta)

    def calibrated(pairs, pair_features):
        return calibrate(uncalibrated(pairs, pair_features), temperature)

    plain = uncalibrated(split, features)
    precision = str(amp_dtype).replace("torch.", "") if amp_dtype else "off"
    return Scored(model, features, calibrated, plain, calibrate(plain, temperature), precision)


def confusion_stem(checkpoints, split):
    """Where the confusion matrix goes: beside the checkpoint, or for an ensemble beside its
    first member, named for all the members (run-checkpoint). A name past the file system's
    255 bytes (many members, long run names) keeps its start and a digest of the whole, so
    that each ensemble still has a file of its own; the results row names every member."""
    first = Path(checkpoints[0])
    if len(checkpoints) == 1:
        name = f"{first.stem}_{split}_confusion"
    else:
        members = "+".join(f"{Path(path).parent.name}-{Path(path).stem}" for path in checkpoints)
        name = f"ensemble_{members}_{split}_confusion"
    if len(os.fsencode(f"{name}.png")) > NAME_MAX:
        # 40 characters are at most 160 bytes of UTF-8
        name = f"{name[:40]}_{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}_confusion"
    return str(first.parent / name)


def run(args):
    device = pick_device(args.device)
    # the pairs before the checkpoints: a bad CSV is reported before seconds of loading
    pairs = read_pairs(args.pairs, LABELLED) if args.pairs else None
    # several checkpoints are checked against each other (one tokenizer, one class list)
    recognizer = EmotionRecognizer.load(args.checkpoint, device, detect=not args.no_detect)
    members = recognizer.members
    classes = recognizer.classes
    if pairs is not None:
        split = labelled_split(pairs, recognizer, args.pairs)
        split_name = f"pairs-{Path(args.pairs).stem}"
        # a user's pairs: no audit, and any class may have sentences
        meta = {"sources": {"kind": "pairs"}, "text_to_class": {name: name for name in classes}}
    else:
        meta = load_meta(args.data)
        data_tokenizer = load_tokenizer(args.data)
        for _, _, info in members:
            check_compatible(info, data_tokenizer, meta)
        split = load_split(args.data, args.split)
        split_name = args.split
    scored = [score_member(model, info, split, args, device, cache=pairs is None) for model, _, info in members]
    uncalibrated = mean_of([member.uncalibrated for member in scored])
    # A user's set may hold only some classes: its macro scores average those (scikit-learn's
    # labels=) instead of counting the absent ones as 0. A prepared split averages all of its classes.
    averaged = np.arange(len(classes)) if pairs is None else np.unique(split["labels"].numpy())
    result = averaged_over(mean_of([member.calibrated for member in scored]), averaged)
    temperature = float(members[0][2]["temperature"])
    n = len(result["labels"])
    stats = {**bootstrap(result["labels"], result["preds"], len(classes), averaged), "averaged": averaged,
             "ece": calibration_error(result["log_probs"], result["labels"]),
             "ece_uncalibrated": calibration_error(uncalibrated["log_probs"], uncalibrated["labels"]),
             # each member of an ensemble has its own temperature
             "temperature": temperature if len(members) == 1 else "",
             "leak_fraction": None if pairs is not None else leaks.evaluated_fraction(meta.get("leaks"), args.split, n)}
    name = " + ".join(args.checkpoint)
    mirrored = ", each image averaged with its mirror" if args.tta else ""
    precision = "/".join(dict.fromkeys(member.precision for member in scored))
    print(f"{name} on {split_name} ({n} pairs{mirrored}) | amp {precision}")
    print(classification_report(result["labels"], result["preds"], labels=averaged,
                                target_names=[classes[i] for i in averaged], digits=4, zero_division=0))
    if stats["leak_fraction"]:
        print(f"warning: {stats['leak_fraction']:.1%} of the {args.split} faces have a near-copy in an "
              "earlier split (meta.json 'leaks'): this score is inflated; prepare_data.py --dedupe drops them")
    rows = [results_row(result, stats, classes, info, path, split_name, args.tta, meta)
            for (_, _, info), path in zip(members, args.checkpoint)]
    row = rows[0] if len(rows) == 1 else ensemble_row(rows)
    # before the confusion matrix: a foreign results file is refused before anything is written
    append_row(args.results, row)
    stem = confusion_stem(args.checkpoint, split_name)
    matrix = confusion_matrix(result["labels"], result["preds"], labels=range(len(classes)))
    save_confusion(matrix, classes, stem)
    calibrated_at = (f"temperature {temperature:.3f}" if len(members) == 1
                     else f"each of the {len(members)} members' temperature")
    over = "" if len(averaged) == len(classes) else f" over the {len(averaged)} classes in the labels"
    print(f"accuracy {row['Test_Accuracy']:.4f} [{row['Accuracy_CI_Low']:.4f}, "
          f"{row['Accuracy_CI_High']:.4f}] | macro-F1{over} {row['Macro_F1']:.4f} "
          f"[{row['Macro_F1_CI_Low']:.4f}, {row['Macro_F1_CI_High']:.4f}] (95 % bootstrap "
          f"intervals, {RESAMPLES} resamples) | ECE {row['ECE']:.4f} at {calibrated_at}, "
          f"{row['ECE_Uncalibrated']:.4f} uncalibrated ({ECE_BINS} bins)")
    print(f"confusion matrix: {stem}.png")
    print_results(args.results)
    if args.ablate:
        per_member = [ablations(member.model, split, member.features, member.again) for member in scored]
        # an ensemble's ablation rows: the mean of its members' rows, for the rows that every member has
        common = [row for row in per_member[0] if all(row in rows for rows in per_member)]
        ablated = {row: averaged_over(mean_of([rows[row] for rows in per_member]), averaged) for row in common}
        print(f"\nablation on {split_name}:")
        print_ablations({"full model": result, **ablated}, classes, set(meta["text_to_class"].values()))
        modality = members[0][0].cfg.modality
        if modality != "both":
            missing = "text" if modality == "image" else "image"
            print(f"(a single-modality model, {modality} only: the rows that take away "
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

"""Score a checkpoint (or an ensemble of several) on the fixed test (or val) pairs, or on a
CSV of one's own labelled pairs, in the reference's results format.

    python evaluate.py --checkpoint checkpoints/model_b/best.pt
    python evaluate.py --checkpoint checkpoints/model_a/best.pt --split val --ablate --tta
    python evaluate.py --checkpoint checkpoints/model_a/best.pt --tta crops           # twelve views a face
    python evaluate.py --checkpoint runs/s0/best.pt runs/s1/best.pt runs/s2/best.pt   # one ensemble row
    python evaluate.py --checkpoint checkpoints/model_b/best.pt --pairs mine.csv      # image,text,label

Deterministic: the pairs were fixed by prepare_data.py, nothing is augmented and the
bootstrap is seeded, so the same checkpoint gives the same numbers every time. Prints a
per-class table, 95 % intervals and the calibration error (with the temperature stored in
the checkpoint and without it), writes the confusion matrix (CSV + PNG) next to the
checkpoint and appends one row to the results CSV. By default the forward pass runs at the
precision the run was trained at (its --amp).

Several checkpoints of one data set (one tokenizer, one class list) are an ensemble: each
member's calibrated probabilities are averaged, and the row is named for all of them.
--pairs reads a CSV with the columns image,text,label (a class name; photo paths relative to
the CSV; image or text may be empty): each photo's largest face is found and cropped as
demo.py does, and the pairs are scored like a prepared split. A row whose photo cannot be
read is left out, with a warning that counts it. Their macro scores average the classes in
their labels (a set of Happy and Sad faces is not marked down for the five classes it lacks);
the row's Classes_Averaged says how many.
"""
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix

import leaks
from checkpoints import CheckpointError, check_compatible
from data import Batches, cached_features, load_meta, load_split, load_tokenizer
from metrics import (ECE_BINS, RESAMPLES, ablations, bootstrap, calibration_error, evaluate, scores,
                     summarize, temper)
from pairs import LABELLED, read_pairs
from recognizer import EmotionRecognizer
from results import append_row, ensemble_row, print_results, results_row
from runtime import DataError, atomic_write, autocast, pick_device, positive_int, script_parser

# --tta crops: each crop's side, a fraction of the face's
CROP_FRACTION = 0.9
# the longest file name that ext4, XFS and most other file systems take, in bytes
NAME_MAX = 255

def score(model, split, features, batch_size, device, mixed_precision, tta=None):
    """evaluate() over a whole split. `features`: the trunk cache, dicts of [V,N,...] (variant 1
    holds the mirrored images), or None to run the trunk. `tta` "mirror" averages the
    probabilities of each image and of its mirror; "crops" adds five crops of each (crop_views)."""
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
    views = [plain, one_view(1)]
    if tta == "crops":
        # the cache holds whole faces: the trunk reads the crops
        views += [evaluate(model, Batches({**split, "images": crop}, batch_size, device), mixed_precision)
                  for crop in crop_views(split["images"])]
    return mean_of(views)


def crop_views(images, fraction=CROP_FRACTION):
    """uint8 faces (N, S, S) -> ten (N, c, c) views, c = fraction * S: the centre and the four
    corners, of each face and of its mirror (FER2013's ten-crop evaluation). Fine-tuning trains
    on random crops of 89-100 % of the side; the model resizes a crop to its input as it does a face."""
    side = images.shape[-1]
    crop = round(fraction * side)
    far = side - crop
    corners = [(far // 2, far // 2), (0, 0), (0, far), (far, 0), (far, far)]
    return [face[:, top:top + crop, left:left + crop].contiguous()
            for face in (images, images.flip(-1)) for top, left in corners]


def mean_of(results):
    """score()'s results of the same pairs (views of them, or ensemble members) -> the result of
    their mean probabilities. The log of the mean as a logsumexp: exact where a probability
    underflows to 0. One result is returned as it is."""
    if len(results) == 1:
        return results[0]
    stacked = torch.stack([result["log_probs"] for result in results])  # (V, N, C)
    return summarize(torch.logsumexp(stacked, dim=0) - math.log(len(results)),
                     torch.from_numpy(results[0]["labels"]))


def averaged_over(result, averaged):
    """`result` with its macro-F1 the mean over the class ids `averaged` alone (metrics.scores)."""
    return {**result, **scores(result["labels"], result["preds"], result["log_probs"].shape[1], averaged)}


def calibrate(result, temperature):
    """`result` (score()'s) with its probabilities softened or sharpened by the checkpoint's
    temperature. Under --tta the temperature, fitted on single views, divides the averaged
    log-probabilities: the predictions, and so every score but the ECE, stay as they were."""
    return summarize(temper(result["log_probs"], temperature), torch.from_numpy(result["labels"]))


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
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="PATH",
                   help="a train.py checkpoint, e.g. checkpoints/model_b/best.pt, or several of one data "
                        "set: an ensemble of their calibrated probabilities, scored as one row")
    p.add_argument("--data", default="data/processed",
                   help="the prepared data (prepare_data.py --out) the model was trained on")
    p.add_argument("--split", choices=["test", "val"], default="test", help="the pairs to score")
    p.add_argument("--pairs", metavar="CSV", help="score one's own labelled pairs instead of --data: a CSV "
                   "with the columns image,text,label (a class name); photo paths relative to the CSV")
    p.add_argument("--no-detect", action="store_true",
                   help="--pairs: no face detection, each photo's centre square is its face")
    p.add_argument("--results", default="test_results.csv",
                   help="the results CSV: one row is appended per evaluation")
    p.add_argument("--ablate", action="store_true",
                   help="also score with the text emptied or shuffled, and the image blanked or shuffled")
    p.add_argument("--tta", nargs="?", const="mirror", choices=["mirror", "crops"],
                   help="average the probabilities of each image and its mirror (--tta); --tta crops "
                        "adds five crops of 90 %% of the side (the centre, the corners) of each")
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


def labelled_split(pairs, recognizer, path):
    """A pairs CSV's rows -> a split as load_split gives it: each photo's largest face cropped as
    the demo crops it (or the blank face), its sentence's ids, its label. Rows that cannot be
    read are left out and counted in one warning; an unknown label is a DataError. Only the
    face crop and the ids are kept: a phone photo is 36 MB decoded, a thousand of them 36 GB."""
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
        # a copy: the slice would keep every face of a group photo
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
    """score() one checkpoint at its run's precision, from the feature cache where `cache`."""
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
    # several checkpoints: checked against each other (one tokenizer, one class list)
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
    # A user's set may hold some classes only: its macro scores average those (scikit-learn's
    # labels=), not the absent ones at 0. A prepared split averages all of its classes.
    averaged = np.arange(len(classes)) if pairs is None else np.unique(split["labels"].numpy())
    result = averaged_over(mean_of([member.calibrated for member in scored]), averaged)
    temperature = float(members[0][2]["temperature"])
    n = len(result["labels"])
    stats = {**bootstrap(result["labels"], result["preds"], len(classes), averaged), "averaged": averaged,
             "ece": calibration_error(result["log_probs"], result["labels"]),
             "ece_uncalibrated": calibration_error(uncalibrated["log_probs"], uncalibrated["labels"]),
             # an ensemble's members have a temperature each
             "temperature": temperature if len(members) == 1 else "",
             "leak_fraction": None if pairs is not None else leaks.evaluated_fraction(meta.get("leaks"), args.split, n)}
    name = " + ".join(args.checkpoint)
    mirrored = {None: "", "mirror": ", each image averaged with its mirror",
                "crops": ", each image averaged with its mirror and five crops of each"}[args.tta]
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
    # first: it refuses a foreign results file before any write
    append_row(args.results, row)
    stem = confusion_stem(args.checkpoint, split_name)
    matrix = confusion_matrix(result["labels"], result["preds"], labels=range(len(classes)))
    save_confusion(matrix, classes, stem)
    calibrated_at = f"temperature {temperature:.3f}" if len(members) == 1 else f"each of the {len(members)} members' temperature"
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
        # an ensemble's row: its members' rows averaged, where every member has one
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

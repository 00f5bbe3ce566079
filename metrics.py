"""Metrics: the one evaluation pass, scores, bootstrap intervals, calibration, curves.

    from metrics import evaluate, scores, bootstrap, calibration_error, fit_temperature, temper
    result = evaluate(model, batches)              # loss, accuracy, macro-F1, recall, predictions
    low, high = bootstrap(result["labels"], result["preds"], 7)["accuracy"]
    temperature = fit_temperature(val["log_probs"], val["labels"])   # on val, after training
    calibrated = temper(result["log_probs"], temperature)

train.py validates and evaluate.py tests with the same evaluate() (nanoGPT's estimate_loss),
so the two can never disagree on what a score means.
"""
import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from runtime import DataError, atomic_write

RESAMPLES = 1000
ECE_BINS = 15
# The search range of fit_temperature: far past any temperature a trained model needs
# (Guo et al. report 1.1 to 3.5), and finite where the val NLL falls without end (every pair right).
TEMPERATURE_RANGE = (0.01, 100.0)


def class_counts(labels, preds, num_classes):
    """Per class: true pairs, predicted pairs and hits (true and predicted), each [C]."""
    labels = np.asarray(labels)
    preds = np.asarray(preds)
    return (np.bincount(labels, minlength=num_classes), np.bincount(preds, minlength=num_classes),
            np.bincount(labels[labels == preds], minlength=num_classes))


def scores(labels, preds, num_classes, averaged=None):
    """Accuracy and macro-F1. Macro-F1 is the mean F1 over the class ids `averaged` (scikit-learn's labels=,
    zero_division=0), or over all C classes when None; a class that is neither in the labels nor
    predicted counts as 0. evaluate.py passes the classes present in a user's labelled set."""
    true, predicted, hits = class_counts(labels, preds, num_classes)
    f1 = np.divide(2 * hits, true + predicted, out=np.zeros(num_classes), where=true + predicted > 0)
    return {"accuracy": float(hits.sum() / len(labels)),
            "macro_f1": float((f1 if averaged is None else f1[averaged]).mean())}


def summarize(log_probs, labels):
    """Loss, scores, per-class recall and predictions from log-probabilities [N,C] and labels [N]."""
    preds = log_probs.argmax(1)
    num_classes = log_probs.shape[1]
    true, _, hits = class_counts(labels.numpy(), preds.numpy(), num_classes)
    return {"loss": F.nll_loss(log_probs, labels).item(),
            **scores(labels.numpy(), preds.numpy(), num_classes),
            "recall": np.divide(hits, true, out=np.zeros(num_classes), where=true > 0),
            "preds": preds.numpy(), "labels": labels.numpy(), "log_probs": log_probs}


@torch.no_grad()
def evaluate(model, batches, mixed_precision=nullcontext()):
    """Loss, accuracy, macro-F1, per-class recall, predictions and log-probabilities of `model` over `batches`."""
    model.eval()
    log_probs = []
    labels = []
    index = []
    for batch in batches:
        with mixed_precision:
            logits = model(batch["input_ids"], batch["lengths"], images=batch.get("images"),
                           image_features=batch.get("image_features"))
        log_probs.append(F.log_softmax(logits.float(), dim=1).cpu())  # (B, C)
        labels.append(batch["labels"].cpu())
        index.append(batch["index"].cpu())
    # data.Batches serves the rows sorted by length: back to their order in the split
    back = torch.cat(index).argsort()
    return summarize(torch.cat(log_probs)[back], torch.cat(labels)[back])


def bootstrap(labels, preds, num_classes, averaged=None, resamples=RESAMPLES, seed=0):
    """95 % intervals of accuracy and macro-F1 (percentiles over test sets of the same size
    drawn with replacement): how far the score would move on another test set like this one.
    Every draw averages the same classes, `averaged` (see scores), whichever of them it holds."""
    generator = np.random.default_rng(seed)
    draws = [scores(labels[rows], preds[rows], num_classes, averaged)
             for rows in (generator.integers(0, len(labels), len(labels)) for _ in range(resamples))]
    return {key: tuple(np.percentile([draw[key] for draw in draws], [2.5, 97.5]))
            for key in ("accuracy", "macro_f1")}


def calibration_error(log_probs, labels, bins=ECE_BINS):
    """Expected calibration error (Guo et al., 2017): pairs binned by confidence (the top
    probability) into equal-width bins (b/M, (b+1)/M]; the gap between mean confidence and
    accuracy in each bin, weighted by the bin's share of the pairs."""
    confidence, preds = log_probs.exp().max(dim=1)  # (N,), (N,)
    gaps = confidence - (preds == torch.as_tensor(labels)).float()  # (N,)
    bin_of = (confidence * bins).ceil().long().clamp(1, bins) - 1
    return float(torch.bincount(bin_of, weights=gaps, minlength=bins).abs().sum() / len(gaps))


def temper(logits, temperature):
    """log softmax(logits / T) [N,C]. `logits` may be log-probabilities as well: log_softmax
    subtracts one constant per row, and a constant divided by T is still one, so
    log_softmax(log_softmax(z) / T) equals log_softmax(z / T). A positive T never moves the argmax."""
    return F.log_softmax(logits / temperature, dim=1)


def fit_temperature(logits, labels, bounds=TEMPERATURE_RANGE, steps=60):
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) over `labels` (temperature
    scaling: Guo et al., 2017), fitted on val after training; `logits` [N,C] may be log-probabilities.
    The NLL is convex in 1/T, so it has one minimum along log T: a golden-section search over log T finds
    it without gradients or a learning rate, and the same inputs give the same T on any machine."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        raise DataError("cannot fit a temperature on an empty val split: prepare the data again "
                        "with val pairs (prepare_data.py), or evaluate without calibration")
    logits = torch.as_tensor(logits).double()

    def nll(log_t):
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    # the inverse of the golden ratio: each step reuses one probe and computes one new one
    shrink = (math.sqrt(5) - 1) / 2
    low = math.log(bounds[0])
    high = math.log(bounds[1])
    left = high - shrink * (high - low)
    right = low + shrink * (high - low)
    left_nll = nll(left)
    right_nll = nll(right)
    for _ in range(steps):
        # keep the side of the lower probe; the kept probe is one of the new pair
        if left_nll <= right_nll:
            high = right
            right = left
            right_nll = left_nll
            left = high - shrink * (high - low)
            left_nll = nll(left)
        else:
            low = left
            left = right
            left_nll = right_nll
            right = low + shrink * (high - low)
            right_nll = nll(right)
    return math.exp((low + high) / 2)


def ablations(model, split, features, scored, seed=0):
    """Scores with one input taken away, for each input that `model` reads; `scored(split, features)`
    scores a split with everything else fixed. A fused model never saw the empty text or the blank
    image in training, so those rows also measure its reaction to something new; the shuffled rows
    (each real sentence or face beside another pair's, seeded) keep the inputs and remove only the pairing."""
    rows = {}
    order = torch.randperm(len(split["labels"]), generator=torch.Generator().manual_seed(seed))
    if model.uses_text:
        empty = {**split, "input_ids": torch.zeros_like(split["input_ids"][:, :1]),
                 "lengths": torch.zeros_like(split["lengths"])}
        shuffled = {**split, "input_ids": split["input_ids"][order], "lengths": split["lengths"][order]}
        rows["no text"] = scored(empty, features)
        rows["shuffled text"] = scored(shuffled, features)
    if model.uses_image:
        rows["no image"] = scored(split, blank_features(model, split))
        # the labels stay with the texts
        faces = {**split, "images": split["images"][order]}
        face_features = None if features is None else {k: v[:, order] for k, v in features.items()}
        rows["shuffled image"] = scored(faces, face_features)
    return rows


def blank_features(model, split):
    """The blank face's features laid out as the cache holds them, float16 [2,N,...] on the CPU
    (a blank image is its own mirror, so both views share it)."""
    features = model.image_encoder.blank_features(split["images"].shape[-1])
    return {k: v.cpu().half().expand(2, len(split["labels"]), *v.shape[1:]) for k, v in features.items()}


def plot_curves(rows, path):
    """A run's loss and accuracy per epoch, train and val (rows as in log.csv)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a training box
    import matplotlib.pyplot as plt
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ["loss", "accuracy"]):
        for split in ("train", "val"):
            ax.plot(epochs, [float(r[f"{split}_{metric}"]) for r in rows], marker=".", label=split)
        ax.set(xlabel="epoch", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

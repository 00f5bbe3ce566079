"""Metrics: the one evaluation pass, scores, bootstrap intervals, calibration, curves.

    from metrics import evaluate, scores, bootstrap, calibration_error
    result = evaluate(model, batches)              # loss, accuracy, macro-F1, recall, predictions
    low, high = bootstrap(result["labels"], result["preds"], 7)["accuracy"]

train.py validates and evaluate.py tests with the same evaluate() (nanoGPT's estimate_loss),
so the two can never disagree on what a score means. Torch and numpy only: scikit-learn's
report and the results CSV are evaluate.py's; the batches are data.py's.
"""
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from runtime import atomic_write

RESAMPLES = 1000
ECE_BINS = 15


def class_counts(labels, preds, num_classes):
    """Per class: true pairs, predicted pairs and hits (true and predicted), each [C]."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return (np.bincount(labels, minlength=num_classes), np.bincount(preds, minlength=num_classes),
            np.bincount(labels[labels == preds], minlength=num_classes))


def scores(labels, preds, num_classes):
    """Accuracy and macro-F1, as training, validation, testing and the bootstrap all report them.
    Macro-F1 is the mean over all C classes (scikit-learn's labels=range(C), zero_division=0):
    a class the model never predicts counts as 0 even where a batch holds none of it."""
    true, predicted, hits = class_counts(labels, preds, num_classes)
    f1 = np.divide(2 * hits, true + predicted, out=np.zeros(num_classes), where=true + predicted > 0)
    return {"accuracy": float(hits.sum() / len(labels)), "macro_f1": float(f1.mean())}


def summarize(log_probs, labels):
    """Loss, scores, per-class recall and predictions from log-probabilities [N,C] and labels [N]."""
    preds, num_classes = log_probs.argmax(1), log_probs.shape[1]
    true, _, hits = class_counts(labels.numpy(), preds.numpy(), num_classes)
    return {"loss": F.nll_loss(log_probs, labels).item(),
            **scores(labels.numpy(), preds.numpy(), num_classes),
            "recall": np.divide(hits, true, out=np.zeros(num_classes), where=true > 0),
            "preds": preds.numpy(), "labels": labels.numpy(), "log_probs": log_probs}


@torch.no_grad()
def evaluate(model, batches, mixed_precision=nullcontext()):
    """Loss, accuracy, macro-F1, per-class recall, predictions and log-probabilities of `model`
    over `batches`. The one metric function: train.py validates with it, evaluate.py tests with it."""
    model.eval()
    log_probs, labels = [], []
    for batch in batches:
        with mixed_precision:
            logits = model(batch["input_ids"], batch["lengths"], images=batch.get("images"),
                           image_features=batch.get("image_features"))
        log_probs.append(F.log_softmax(logits.float(), dim=1).cpu())  # (B, C)
        labels.append(batch["labels"].cpu())
    return summarize(torch.cat(log_probs), torch.cat(labels))


def bootstrap(labels, preds, num_classes, resamples=RESAMPLES, seed=0):
    """95 % intervals of accuracy and macro-F1 (percentiles over test sets of the same size
    drawn with replacement): how far the score would move on another test set like this one."""
    generator = np.random.default_rng(seed)
    draws = [scores(labels[rows], preds[rows], num_classes)
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
        ax.set_xlabel("epoch"), ax.set_ylabel(metric), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

"""The slow tier: with a trunk that reads the synthetic faces, the face is worth something in the
ablation (only it names Disgust and Neutral), and modality dropout makes one input enough."""
import numpy as np
import pytest
import torch

from checkpoints import load_checkpoint
from data import Batches, cached_features, load_split
from metrics import ablations, evaluate

pytestmark = pytest.mark.slow
# Disgust and Neutral: no sentence names them
TEXTLESS = (1, 4)


def ablation_rows(root, run):
    """The full model's test result and its ablation rows, with what the rows were made from."""
    model, _, _ = load_checkpoint(root / "runs" / run / "best.pt")
    split = load_split(root / "processed", "test")
    features, _ = cached_features(model, split["images"], root / "cache", "cpu", flips=False,
                                  show_progress=False)

    def scored(pairs, pair_features):
        return evaluate(model, Batches(pairs, 256, "cpu", features=pair_features))

    rows = {"full model": scored(split, features), **ablations(model, split, features, scored)}
    return rows, split, features, scored


def face_is_worth(full, without_face, margin=0.1):
    """Taking the face away costs both Disgust and Neutral recall at least `margin`."""
    return all(full["recall"][c] - without_face["recall"][c] >= margin for c in TEXTLESS)


def text_is_worth(full, without_text, margin=0.3):
    """Taking the sentence away costs the accuracy on the five classes it names at least `margin`."""
    def text_accuracy(result):
        named = ~np.isin(result["labels"], TEXTLESS)
        return (result["preds"][named] == result["labels"][named]).mean()
    return text_accuracy(full) - text_accuracy(without_text) >= margin


def test_the_face_carries_disgust_and_neutral_and_the_sentence_the_rest(face_runs):
    rows, split, features, scored = ablation_rows(face_runs, "fused")
    full = rows["full model"]
    assert face_is_worth(full, rows["shuffled image"]), [rows[r]["recall"] for r in ("full model", "shuffled image")]
    assert text_is_worth(full, rows["shuffled text"])
    # Each check fails on a broken row: labels that move with the shuffled faces (or sentences)
    # keep every pair intact, so nothing is taken away.
    order = torch.randperm(len(split["labels"]), generator=torch.Generator().manual_seed(0))
    faces_and_labels = {**split, "images": split["images"][order], "labels": split["labels"][order]}
    broken_faces = scored(faces_and_labels, {k: v[:, order] for k, v in features.items()})
    assert not face_is_worth(full, broken_faces)
    texts_and_labels = {**split, "input_ids": split["input_ids"][order], "lengths": split["lengths"][order],
                        "labels": split["labels"][order], "images": split["images"][order]}
    broken_texts = scored(texts_and_labels, {k: v[:, order] for k, v in features.items()})
    assert not text_is_worth(full, broken_texts)


def test_modality_dropout_makes_one_input_enough(face_runs):
    plain, _, _, _ = ablation_rows(face_runs, "fused")
    dropped, _, _, _ = ablation_rows(face_runs, "fused_md")
    accuracy = {run: {row: result["accuracy"] for row, result in rows.items()}
                for run, rows in (("plain", plain), ("dropout", dropped))}
    # A model that learned with missing inputs beats the one that never missed one on either
    # input alone, and without its sentence it reads the face about as well as the image-only
    # model whose trunk it shares.
    image_only, _, _, _ = ablation_rows(face_runs, "image")
    assert accuracy["dropout"]["no text"] > accuracy["plain"]["no text"], accuracy
    assert accuracy["dropout"]["no image"] > accuracy["plain"]["no image"] + 0.05, accuracy
    assert accuracy["dropout"]["no text"] > image_only["full model"]["accuracy"] - 0.03, accuracy

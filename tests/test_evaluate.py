"""evaluate.py: deterministic rows in the reference's format, equal to scikit-learn; intervals,
calibration, test-time mirroring and ablations that measure what each input is worth."""
import csv
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

import evaluate
import metrics
import prepare_data
from conftest import SYNTHETIC
from data import Batches, cached_features, load_split
from checkpoints import load_checkpoint
from models import build_model


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_eval(checkpoint, processed, results, *extra):
    return evaluate.main(["--checkpoint", str(checkpoint), "--data", str(processed),
                          "--results", str(results), "--cache-dir", str(results.parent / "cache"),
                          *extra])


def test_rows_are_deterministic_and_in_the_reference_format(runs, processed, tmp_path):
    results = tmp_path / "results.csv"
    for _ in range(2):
        assert run_eval(runs / "model_b" / "best.pt", processed, results) == 0
    first, second = rows(results)
    assert first == second
    header = next(csv.reader(open(results)))
    assert header[:17] == ["Experiment_ID", "Test_Accuracy", "Macro_Precision", "Macro_Recall",
                           "Macro_F1", "Final_Train_Accuracy", "Final_Val_Accuracy",
                           "Best_Val_Accuracy", "Cross_Attention", "Dropout", "Learning_Rate",
                           "Epochs", "Batch_Size", "Transformer_Layers", "Transformer_Heads",
                           "Optimizer", "Data_Augmentation"]
    assert header[17:20] == ["Angry_F1", "Angry_Precision", "Angry_Recall"]
    assert float(first["Test_Accuracy"]) <= 1 and "%" not in first["Test_Accuracy"]
    assert first["Modality"] == "both" and first["TTA"] == "False"  # a checkpoint without the field
    assert (float(first["Accuracy_CI_Low"]) <= float(first["Test_Accuracy"])
            <= float(first["Accuracy_CI_High"]) <= 1)
    assert float(first["Macro_F1_CI_Low"]) <= float(first["Macro_F1"]) <= float(first["Macro_F1_CI_High"])
    assert 0 <= float(first["ECE"]) <= 1
    assert (runs / "model_b" / "best_test_confusion.png").exists()
    assert (runs / "model_b" / "best_test_confusion.csv").read_text().count("\n") == 8


def test_numbers_equal_scikit_learn(runs, processed, tmp_path):
    results = tmp_path / "results.csv"
    assert run_eval(runs / "model_a" / "best.pt", processed, results) == 0
    row = rows(results)[0]
    model, _, info = load_checkpoint(runs / "model_a" / "best.pt")
    out = metrics.evaluate(model, Batches(load_split(processed, "test"), 64, "cpu"))
    y, p = out["labels"], out["preds"]
    assert float(row["Test_Accuracy"]) == pytest.approx(accuracy_score(y, p), abs=1e-6)
    macro = precision_recall_fscore_support(y, p, average="macro", zero_division=0)
    for column, value in zip(["Macro_Precision", "Macro_Recall", "Macro_F1"], macro):
        assert float(row[column]) == pytest.approx(value, abs=1e-6)
    per_class = precision_recall_fscore_support(y, p, labels=range(7), zero_division=0)
    for i, name in enumerate(info["classes"]):
        assert float(row[f"{name}_Precision"]) == pytest.approx(per_class[0][i], abs=1e-6)
        assert float(row[f"{name}_Recall"]) == pytest.approx(per_class[1][i], abs=1e-6)
        assert float(row[f"{name}_F1"]) == pytest.approx(per_class[2][i], abs=1e-6)


def test_macro_f1_averages_every_class_as_scikit_learn_does():
    generator = np.random.default_rng(0)
    labels, preds = generator.integers(0, 6, 500), generator.integers(0, 6, 500)  # class 6: never seen
    preds[:40] = labels[:40]
    expected = f1_score(labels, preds, labels=range(7), average="macro", zero_division=0)
    assert metrics.scores(labels, preds, 7) == {"accuracy": pytest.approx(accuracy_score(labels, preds)),
                                                  "macro_f1": pytest.approx(expected)}
    assert metrics.scores(labels, preds, 7)["macro_f1"] < f1_score(labels, preds, average="macro")


def test_bootstrap_is_seeded_and_brackets_the_score():
    generator = np.random.default_rng(1)
    labels = generator.integers(0, 7, 400)
    preds = np.where(generator.random(400) < 0.7, labels, generator.integers(0, 7, 400))
    intervals = metrics.bootstrap(labels, preds, 7)
    assert intervals == metrics.bootstrap(labels, preds, 7)
    point = metrics.scores(labels, preds, 7)
    for key, (low, high) in intervals.items():
        assert low < point[key] < high
        assert 0.05 < high - low < 0.15  # about 4 standard errors of a proportion near 0.7 at n=400
    assert metrics.bootstrap(labels, preds, 7, seed=1) != intervals


def test_calibration_error_is_the_gap_between_confidence_and_accuracy():
    labels = torch.tensor([0, 1, 0, 1])
    sure = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.95, 0.05], [0.95, 0.05]]).log()
    assert metrics.calibration_error(sure, labels) == pytest.approx(0.45)  # 95 % sure, 50 % right
    calibrated = torch.tensor([[0.5, 0.5]] * 4).log()  # two pairs right by argmax, confidence 0.5
    assert metrics.calibration_error(calibrated, labels) == pytest.approx(0.0)
    two_bins = torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.6, 0.4], [0.6, 0.4]]).log()
    # bin (14/15, 1]: 0.99 sure, 1 of 2 right; bin (8/15, 9/15]: 0.6 sure, 1 of 2 right
    assert metrics.calibration_error(two_bins, labels) == pytest.approx(0.5 * 0.49 + 0.5 * 0.1)


def test_tta_averages_the_probabilities_of_an_image_and_its_mirror(runs, processed, tmp_path):
    model, _, _ = load_checkpoint(runs / "model_a" / "best.pt")
    split = load_split(processed, "test")
    plain = metrics.evaluate(model, Batches(split, 256, "cpu"))
    mirror = metrics.evaluate(model, Batches({**split, "images": split["images"].flip(-1)}, 256, "cpu"))
    expected = (plain["log_probs"].exp() + mirror["log_probs"].exp()) / 2
    assert not torch.allclose(plain["log_probs"], mirror["log_probs"], atol=1e-3)
    # the cached path, as evaluate.py --tta runs it: the mirrors are the cache's variant 1
    features, _ = cached_features(model, split["images"], tmp_path / "cache", "cpu", flips=True,
                                  show_progress=False)
    cached = evaluate.score(model, split, features, 256, "cpu", nullcontext(), tta=True)
    assert torch.allclose(cached["log_probs"].exp(), expected, atol=2e-3)  # the cache is float16
    results = tmp_path / "r.csv"
    assert run_eval(runs / "model_a" / "best.pt", processed, results, "--tta") == 0
    assert rows(results)[0]["TTA"] == "True"
    assert float(rows(results)[0]["Test_Accuracy"]) == pytest.approx(cached["accuracy"], abs=1e-6)


def test_ablation_shows_what_the_text_is_worth(runs, processed, tmp_path, capsys):
    assert run_eval(runs / "model_a" / "best.pt", processed, tmp_path / "r.csv", "--ablate") == 0
    table = capsys.readouterr().out.split("ablation on test:")[1].splitlines()
    assert table[1].split()[-4:] == ["Disgust", "recall", "Neutral", "recall"]
    scores = {line[:14].strip(): [float(x) for x in line[14:].split()] for line in table[2:7]}
    assert list(scores) == ["full model", "no text", "shuffled text", "no image", "shuffled image"]
    full, no_text, shuffled = scores["full model"], scores["no text"], scores["shuffled text"]
    # columns: accuracy, macro-F1, accuracy on the text classes, Disgust recall, Neutral recall
    assert full[2] > 0.6
    assert no_text[2] < full[2] - 0.3 and shuffled[2] < full[2] - 0.3
    # A random frozen trunk shows this model nothing of the faces: moving them to other pairs
    # leaves the texts, and the labels that stay with them, as readable as before.
    assert abs(scores["shuffled image"][2] - full[2]) < 0.1


def test_ablation_inputs_and_the_rows_a_single_input_model_cannot_have(runs, processed):
    model, _, _ = load_checkpoint(runs / "model_a" / "best.pt")
    split = load_split(processed, "test")

    def inputs(pairs, features):  # stands in for score(): what each row would be scored on
        return pairs, features
    features = {"pooled": torch.arange(len(split["labels"]), dtype=torch.float16).view(1, -1, 1)}
    made = evaluate.ablations(model, split, features, inputs)
    assert list(made) == ["no text", "shuffled text", "no image", "shuffled image"]
    (empty, _), (shuffled, _), (same, blank), (faces, face_features) = made.values()
    assert empty["lengths"].eq(0).all() and empty["input_ids"].eq(0).all()
    assert not torch.equal(shuffled["input_ids"], split["input_ids"])
    assert sorted(map(tuple, shuffled["input_ids"].tolist())) == sorted(map(tuple, split["input_ids"].tolist()))
    assert torch.equal(evaluate.ablations(model, split, None, inputs)["shuffled text"][0]["input_ids"],
                       shuffled["input_ids"])  # seeded
    assert same is split and blank["pooled"].shape[:2] == (2, len(split["labels"]))
    assert blank["pooled"].eq(blank["pooled"][0, 0]).all(-1).all()  # one blank image for every pair
    # the shuffled faces move with their cached features; texts and labels stay in place
    order = face_features["pooled"].view(-1).long()
    assert sorted(order.tolist()) == list(range(len(order))) and not torch.equal(order, torch.arange(len(order)))
    assert torch.equal(faces["images"], split["images"][order])
    assert faces["labels"] is split["labels"] and faces["input_ids"] is split["input_ids"]
    text_only, image_only = (build_model(replace(model.cfg, modality=modality)) for modality in ("text", "image"))
    assert list(evaluate.ablations(text_only, split, None, inputs)) == ["no text", "shuffled text"]
    assert list(evaluate.ablations(image_only, split, None, inputs)) == ["no image", "shuffled image"]


@pytest.fixture
def five_class_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop")
    assert prepare_data.main([*SYNTHETIC, "--raw-dir", str(root / "raw"), "--out",
                              str(root / "processed"), "--unpaired", "drop"]) == 0
    return root / "processed"


def test_bad_input_is_one_line_and_writes_nothing(runs, processed, five_class_data, tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    wrong_columns = tmp_path / "other.csv"
    wrong_columns.write_text("a,b\n1,2\n")
    cases = [(tmp_path / "missing.pt", processed, tmp_path / "r.csv"),
             (not_a_checkpoint, processed, tmp_path / "r.csv"),
             (foreign, processed, tmp_path / "r.csv"),
             (runs / "model_a" / "best.pt", five_class_data, tmp_path / "r.csv"),
             (runs / "model_a" / "last.pt", processed, wrong_columns)]
    for checkpoint, data, results in cases:
        assert run_eval(checkpoint, data, results) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r.csv").exists()
    assert wrong_columns.read_text() == "a,b\n1,2\n"
    assert not (runs / "model_a" / "last_test_confusion.csv").exists()

"""evaluate.py: deterministic rows in the reference's format, equal to scikit-learn."""
import csv

import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

import evaluate
import prepare_data
from conftest import SYNTHETIC
from data import Batches, load_split
from models import load_checkpoint


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
    assert (runs / "model_b" / "best_test_confusion.png").exists()
    assert (runs / "model_b" / "best_test_confusion.csv").read_text().count("\n") == 8


def test_numbers_equal_scikit_learn(runs, processed, tmp_path):
    results = tmp_path / "results.csv"
    assert run_eval(runs / "model_a" / "best.pt", processed, results) == 0
    row = rows(results)[0]
    model, _, info = load_checkpoint(runs / "model_a" / "best.pt")
    out = evaluate.evaluate(model, Batches(load_split(processed, "test"), 64, "cpu"))
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


def test_ablation_scores_each_modality(runs, processed, tmp_path, capsys):
    assert run_eval(runs / "model_b" / "best.pt", processed, tmp_path / "r.csv", "--ablate") == 0
    table = capsys.readouterr().out
    assert "no text" in table and "no image" in table and "full model" in table


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

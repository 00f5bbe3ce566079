"""evaluate.py: deterministic rows in the reference's format, equal to scikit-learn; intervals,
calibration, test-time mirroring and ablations that measure what each input is worth."""
import csv
import fcntl
import json
import multiprocessing
import shutil
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

import evaluate
import metrics
import prepare_data
from conftest import SYNTHETIC, resave
from data import Batches, cached_features, load_split
from models import build_model, load_checkpoint
from evaluate import REFERENCE_COLUMNS, append_row, print_results


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
    assert first["Modality"] == "both" and first["TTA"] == "no"  # a checkpoint without the field
    assert (float(first["Accuracy_CI_Low"]) <= float(first["Test_Accuracy"])
            <= float(first["Accuracy_CI_High"]) <= 1)
    assert float(first["Macro_F1_CI_Low"]) <= float(first["Macro_F1"]) <= float(first["Macro_F1_CI_High"])
    assert 0 <= float(first["ECE"]) <= 1
    assert (runs / "model_b" / "best_test_confusion.png").exists()
    assert (runs / "model_b" / "best_test_confusion.csv").read_text().count("\n") == 8


def test_numbers_equal_scikit_learn(runs, processed, tmp_path):
    # Both sides the same computation: fp32, the trunk on the images, batches of 64 (the run's
    # own --amp is bf16 on a CPU that has it, and the cache stores float16 features).
    results = tmp_path / "results.csv"
    assert run_eval(runs / "model_a" / "best.pt", processed, results, "--amp", "off", "--no-cache",
                    "--batch-size", "64") == 0
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


def test_macro_f1_over_the_classes_present_is_scikit_learns_labels():
    # a user's set labelled with three classes; the model also answers the other four
    generator = np.random.default_rng(2)
    labels = generator.choice([0, 3, 5], 300)
    preds = np.where(generator.random(300) < 0.6, labels, generator.integers(0, 7, 300))
    present = np.unique(labels)
    expected = f1_score(labels, preds, labels=present, average="macro", zero_division=0)
    assert metrics.scores(labels, preds, 7, present)["macro_f1"] == pytest.approx(expected)
    # perfect answers: 1, not 3/7
    assert metrics.scores(labels, labels, 7, present)["macro_f1"] == pytest.approx(1.0)
    assert metrics.scores(labels, labels, 7)["macro_f1"] == pytest.approx(3 / 7)
    # each bootstrap draw: the same classes, whatever the draw holds
    generator = np.random.default_rng(0)
    draws = [f1_score(labels[rows], preds[rows], labels=present, average="macro", zero_division=0)
             for rows in (generator.integers(0, 300, 300) for _ in range(50))]
    low, high = metrics.bootstrap(labels, preds, 7, present, resamples=50)["macro_f1"]
    assert (low, high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])))


def test_a_prepared_split_averages_all_its_classes_even_one_it_lacks(runs, processed, tmp_path, monkeypatch):
    # the prepared data keeps all seven classes: a class the split lacks counts as 0, as in training
    def without_angry(data, split):
        pairs = load_split(data, split)
        return {key: value[pairs["labels"] != 0] for key, value in pairs.items()}
    monkeypatch.setattr(evaluate, "load_split", without_angry)
    results = tmp_path / "results.csv"
    assert run_eval(runs / "model_a" / "best.pt", processed, results, "--amp", "off", "--no-cache") == 0
    row = rows(results)[0]
    model, _, _ = load_checkpoint(runs / "model_a" / "best.pt")
    out = metrics.evaluate(model, Batches(without_angry(processed, "test"), 256, "cpu"))
    assert 0 not in out["labels"] and row["Classes_Averaged"] == "7"
    macro = precision_recall_fscore_support(out["labels"], out["preds"], labels=range(7), average="macro",
                                            zero_division=0)
    for column, value in zip(["Macro_Precision", "Macro_Recall", "Macro_F1"], macro):
        assert float(row[column]) == pytest.approx(value, abs=1e-6)


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
    assert rows(results)[0]["TTA"] == "mirror"
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
    made = metrics.ablations(model, split, features, inputs)
    assert list(made) == ["no text", "shuffled text", "no image", "shuffled image"]
    (empty, _), (shuffled, _), (same, blank), (faces, face_features) = made.values()
    assert empty["lengths"].eq(0).all() and empty["input_ids"].eq(0).all()
    assert not torch.equal(shuffled["input_ids"], split["input_ids"])
    assert sorted(map(tuple, shuffled["input_ids"].tolist())) == sorted(map(tuple, split["input_ids"].tolist()))
    assert torch.equal(metrics.ablations(model, split, None, inputs)["shuffled text"][0]["input_ids"],
                       shuffled["input_ids"])  # seeded
    assert same is split and blank["pooled"].shape[:2] == (2, len(split["labels"]))
    assert blank["pooled"].eq(blank["pooled"][0, 0]).all(-1).all()  # one blank image for every pair
    # the shuffled faces move with their cached features; texts and labels stay in place
    order = face_features["pooled"].view(-1).long()
    assert sorted(order.tolist()) == list(range(len(order))) and not torch.equal(order, torch.arange(len(order)))
    assert torch.equal(faces["images"], split["images"][order])
    assert faces["labels"] is split["labels"] and faces["input_ids"] is split["input_ids"]
    text_only, image_only = (build_model(replace(model.cfg, modality=modality)) for modality in ("text", "image"))
    assert list(metrics.ablations(text_only, split, None, inputs)) == ["no text", "shuffled text"]
    assert list(metrics.ablations(image_only, split, None, inputs)) == ["no image", "shuffled image"]


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


def resaved(runs, tmp_path, name, *, temperature=1.0, **train_args):
    """runs/model_a/best.pt saved again as tmp_path/name/best.pt with another temperature
    or other training args (the run folder names the row's Experiment_ID)."""
    source = runs / "model_a" / "best.pt"
    trained_with = load_checkpoint(source)[2]["args"]
    return resave(source, tmp_path / name / "best.pt", args={**trained_with, **train_args},
                  temperature=temperature)


def overconfident(n=4000, temperature=2.0, seed=0):
    """Logits `temperature` times too sharp: labels drawn from softmax(z), logits z * T."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = 3 * torch.randn(n, 7, generator=generator)
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)
    return true_logits * temperature, labels


def test_fit_temperature_recovers_a_known_temperature():
    logits, labels = overconfident(temperature=2.0)
    fitted = metrics.fit_temperature(logits, labels)
    assert fitted == pytest.approx(2.0, rel=0.05)
    assert metrics.fit_temperature(logits, labels) == fitted  # deterministic
    # log-probabilities give the same temperature: log_softmax only shifts each row
    assert metrics.fit_temperature(logits.log_softmax(1), labels) == pytest.approx(fitted, rel=1e-6)
    assert metrics.fit_temperature(logits / 2.0, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_temperature_lowers_the_nll_of_overconfident_logits():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 7, (2000,), generator=generator)
    # right 70 % of the time, each answer given with a margin of 8 (about 99.8 % sure)
    right = torch.rand(2000, generator=generator) < 0.7
    preds = torch.where(right, labels, torch.randint(0, 7, (2000,), generator=generator))
    logits = 8.0 * F.one_hot(preds, 7).float()
    fitted = metrics.fit_temperature(logits, labels)
    assert fitted > 1.5
    calibrated = metrics.temper(logits, fitted)
    assert F.nll_loss(calibrated, labels) < F.cross_entropy(logits, labels) - 0.5
    assert torch.equal(calibrated.argmax(1), logits.argmax(1))
    assert metrics.calibration_error(calibrated, labels) < metrics.calibration_error(
        logits.log_softmax(1), labels) / 4


def test_fit_temperature_refuses_an_empty_split():
    with pytest.raises(ValueError, match="empty val split"):
        metrics.fit_temperature(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long))


def test_evaluate_applies_the_checkpoint_temperature(runs, processed, tmp_path, capsys):
    results = tmp_path / "results.csv"
    for name, temperature in (("plain", 1.0), ("tempered", 2.0)):
        assert run_eval(resaved(runs, tmp_path, name, temperature=temperature), processed, results) == 0
    out = capsys.readouterr().out
    assert "at temperature 2.000" in out and "uncalibrated" in out
    header = next(csv.reader(open(results)))
    assert {"ECE", "ECE_Uncalibrated", "Temperature"} <= set(header)
    plain, tempered = rows(results)
    assert float(plain["Temperature"]) == 1.0 and float(tempered["Temperature"]) == 2.0
    assert plain["ECE"] == plain["ECE_Uncalibrated"] == tempered["ECE_Uncalibrated"]
    assert tempered["ECE"] != plain["ECE"]
    # a positive temperature moves no prediction
    for column in ("Test_Accuracy", "Macro_F1", "Accuracy_CI_Low", "Angry_Recall"):
        assert tempered[column] == plain[column]


def append_rows(path, name, start, count):
    start.wait()
    for i in range(count):
        append_row(path, {"Experiment_ID": f"{name}-{i}", "Test_Accuracy": i / 100})


def test_concurrent_evaluations_each_add_their_row(tmp_path):
    # Two evaluations finishing together: without the lock each reads the file, adds its row
    # and replaces it, and the later replace drops the other's row.
    path = tmp_path / "results.csv"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    workers = [context.Process(target=append_rows, args=(path, name, start, 20)) for name in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    lines = path.read_text().splitlines()
    assert lines.count("Experiment_ID,Test_Accuracy") == 1 and lines[0] == "Experiment_ID,Test_Accuracy"
    assert sorted(row["Experiment_ID"] for row in rows(path)) == sorted(
        f"{name}-{i}" for name in "ab" for i in range(20))


def test_an_evaluation_waits_while_another_holds_the_results_file(tmp_path):
    path = tmp_path / "results.csv"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    worker = context.Process(target=append_rows, args=(path, "waiting", start, 1))
    # started first: a process forked while the lock is held would inherit it
    worker.start()
    with open(tmp_path / "results.csv.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start.wait()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not path.exists()
    worker.join(timeout=60)
    assert worker.exitcode == 0 and [row["Experiment_ID"] for row in rows(path)] == ["waiting-0"]


def test_a_results_file_from_before_a_column_gains_it(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("Experiment_ID,ECE\nold/best,0.1\n")
    append_row(path, {"Experiment_ID": "new/best", "ECE": 0.05, "Temperature": 1.5})
    assert path.read_text() == "Experiment_ID,ECE,Temperature\nold/best,0.1,\nnew/best,0.05,1.5\n"


@pytest.mark.slow
def test_amp_defaults_to_the_runs_own(runs, processed, tmp_path, monkeypatch):
    asked = []
    real_autocast = evaluate.autocast
    real_cache = evaluate.cached_features

    def recording_autocast(device, amp):
        asked.append(("forward", amp))
        return real_autocast(device, "off")

    def recording_cache(*args, amp, **kwargs):
        asked.append(("cache", amp))
        return real_cache(*args, amp="off", **kwargs)

    monkeypatch.setattr(evaluate, "autocast", recording_autocast)
    monkeypatch.setattr(evaluate, "cached_features", recording_cache)
    off = resaved(runs, tmp_path, "trained_off", amp="off")
    bf16 = resaved(runs, tmp_path, "trained_bf16", amp="bf16")
    cases = [(off, [], "off"), (bf16, [], "bf16"), (bf16, ["--amp", "off"], "off")]
    for checkpoint, flags, expected in cases:
        asked.clear()
        assert run_eval(checkpoint, processed, tmp_path / "r.csv", *flags) == 0
        assert asked == [("forward", expected), ("cache", expected)]
    assert evaluate.run_amp(None, {"args": {}}) == "auto"  # a run saved before the flag existed


def test_batch_size_zero_is_one_line(processed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_eval(tmp_path / "any.pt", processed, tmp_path / "r.csv", "--batch-size", "0")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "--batch-size" in err and not (tmp_path / "r.csv").exists()


def test_a_leaky_test_split_is_flagged_with_its_fraction(runs, processed, tmp_path, capsys):
    # The same pairs, with meta.json saying what the audit would for a split that kept copies.
    leaky = tmp_path / "leaky"
    shutil.copytree(processed, leaky)
    meta = json.loads((leaky / "meta.json").read_text())
    meta["leaks"]["remaining"] = {"counts": {"train-val": 0, "train-test": 7, "val-test": 0},
                                  "test_fraction": 0.05}
    (leaky / "meta.json").write_text(json.dumps(meta))
    checkpoint = runs / "model_a" / "best.pt"
    results = tmp_path / "results.csv"
    for data in (processed, leaky):
        assert run_eval(checkpoint, data, results) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 5.0% of the test faces have a near-copy in an earlier split (meta.json "
                        "'leaks'): this score is inflated; prepare_data.py --dedupe drops them"]
    assert [float(row["Leak_Fraction"]) for row in rows(results)] == [0.0, 0.05]


def test_results_of_an_older_version_or_of_the_reference_are_read(runs, processed, tmp_path, capsys):
    # The reference writes test_results.csv too, with its 17 columns and percentages; an older
    # version of this project wrote rows without the later columns. The new row joins them, and
    # the table shows what is not a number as it is, and '-' where a row has nothing.
    reference = tmp_path / "test_results.csv"
    reference.write_text(",".join(REFERENCE_COLUMNS) + "\n"
                         + "Model_B_Cross,83.19%,0.8350,0.8319,0.8320,95.1%,84.0%,84.5%,True,0.3,1e-4,"
                         "20,32,2,8,AdamW,True\n")
    assert run_eval(runs / "model_a" / "best.pt", processed, reference) == 0
    table = capsys.readouterr().out.split(f"{reference}:\n")[1].splitlines()
    old, new = rows(reference)
    assert old["Test_Accuracy"] == "83.19%" and old["Accuracy_CI_Low"] == "" and new["Experiment_ID"] == "model_a/best"
    assert table[1].split()[:3] == ["Model_B_Cross", "-", "-"] and "83.19%" in table[1] and "0.8320" in table[1]
    assert table[2].startswith(f"  {'model_a/best':24s} test ") and f"{float(new['Test_Accuracy']):.4f} [" in table[2]
    # a row cut short, as a hand edit or another program leaves it
    older = tmp_path / "older.csv"
    older.write_text("Experiment_ID,Test_Accuracy,Macro_F1,Split\nold/best,0.5\nbad/best,n/a,,val\n")
    print_results(older)
    table = capsys.readouterr().out.splitlines()
    assert table[2].split() == ["old/best", "-", "-", "-", "0.5000", "-", "-", "-", "-", "-"]
    assert table[3].split() == ["bad/best", "val", "-", "-", "n/a", "-", "-", "-", "-", "-"]
    # a file that is not text at all: refused in one line, before anything is written
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Experiment_ID,Test_Accuracy\ncafé/best,0.5\n".encode("latin-1"))
    assert run_eval(runs / "model_a" / "best.pt", processed, latin) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not UTF-8" in err
    assert latin.read_bytes() == "Experiment_ID,Test_Accuracy\ncafé/best,0.5\n".encode("latin-1")

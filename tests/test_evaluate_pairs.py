"""evaluate.py on one's own labelled pairs (--pairs) and on ensembles (several --checkpoint):
the usual row, intervals and confusion matrix through the same code, equal to what the demo
reads and to the members' calibrated probabilities averaged."""
import csv
import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score, precision_recall_fscore_support

import evaluate
import metrics
from models import load_checkpoint
from conftest import resave
from data import Batches, load_split
from recognizer import LABELLED, EmotionRecognizer, read_pairs
from test_demo import PHOTO
from test_recognizer import foreign_tokenizer


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def labelled_pairs(processed, tokenizer, folder, count=40):
    """The first `count` test pairs as a user would have them: PNG faces, sentences, class names."""
    test = load_split(processed, "test")
    classes = json.loads((processed / "meta.json").read_text())["classes"]
    folder.mkdir()
    lines = ["image,text,label"]
    for i in range(count):
        Image.fromarray(test["images"][i].numpy()).save(folder / f"{i}.png")
        text = tokenizer.decode(test["input_ids"][i, :test["lengths"][i]].tolist()).replace('"', "'")
        lines.append(f'faces/{i}.png,"{text}",{classes[test["labels"][i]].lower()}')
    return lines


def test_labelled_pairs_are_scored_as_the_demo_reads_them(runs, processed, tmp_path, capsys):
    checkpoint = resave(runs / "model_b" / "best.pt", tmp_path / "mine" / "best.pt")
    _, tokenizer, info = load_checkpoint(checkpoint)
    lines = labelled_pairs(processed, tokenizer, tmp_path / "faces")
    lines += [f"{PHOTO},so happy today,Happy", ",i am so angry,Angry", "faces/missing.png,hi,Sad"]
    (tmp_path / "mine.csv").write_text("\n".join(lines) + "\n")
    results = tmp_path / "results.csv"
    # fp32, as the recognizer predicts
    assert evaluate.main(["--checkpoint", checkpoint, "--pairs", str(tmp_path / "mine.csv"), "--results",
                          str(results), "--amp", "off", "--ablate"]) == 0
    out = capsys.readouterr().out
    assert "warning: 1 of 43 rows left out of the score, first line 44:" in out and "no such file" in out
    row = rows(results)[0]
    # what the recognizer says of each pair, its largest face, scored by scikit-learn
    recognizer = EmotionRecognizer.load(checkpoint, device="cpu")
    pairs = [line.split(",") for line in lines[1:-1]]
    images = [None if not image else (tmp_path / image if not image.startswith("/") else image) for image, *_ in pairs]
    texts = [",".join(rest[:-1]).strip('"') for _, *rest in pairs]
    labels = [info["classes"].index(rest[-1].capitalize()) for _, *rest in pairs]
    predicted = [info["classes"].index(p.label) for p in recognizer.predict_many(list(zip(images, texts)))]
    assert float(row["Test_Accuracy"]) == pytest.approx(np.mean(np.array(predicted) == labels), abs=1e-6)
    # macro-F1 over the classes in the labels (test_macro_scores_of_labelled_pairs_average_the_classes_in_their_labels)
    present = sorted(set(labels))
    assert float(row["Macro_F1"]) == pytest.approx(f1_score(labels, predicted, labels=present, average="macro",
                                                            zero_division=0), abs=1e-6)
    assert row["Classes_Averaged"] == str(len(present))
    assert row["Split"] == "pairs-mine" and row["Data_Source"] == "pairs" and row["Leak_Fraction"] == ""
    assert float(row["Accuracy_CI_Low"]) <= float(row["Test_Accuracy"]) <= float(row["Accuracy_CI_High"])
    assert (tmp_path / "mine" / "best_pairs-mine_confusion.csv").read_text().count("\n") == 8
    assert "ablation on pairs-mine:" in out


def test_bad_labelled_pairs_are_one_line(runs, tmp_path, capsys):
    checkpoint = str(runs / "model_a" / "best.pt")
    (tmp_path / "unlabelled.csv").write_text(f"image,text\n{PHOTO},hi\n")
    (tmp_path / "unknown.csv").write_text(f"image,text,label\n{PHOTO},hi,Happy\n{PHOTO},hi,Joyful\n")
    (tmp_path / "latin.csv").write_bytes(f"image,text,label\n{PHOTO},déjà vu,Happy\n".encode("latin-1"))
    (tmp_path / "unreadable.csv").write_text("image,text,label\nmissing.png,,Happy\n")
    for name, words in [("unlabelled", "line 1 (the header) has no label column"),
                        ("unknown", "line 3: the label 'Joyful' is not one of"), ("latin", "line 2 is not UTF-8"),
                        ("unreadable", "no pair to score")]:
        results = tmp_path / "r.csv"
        assert evaluate.main(["--checkpoint", checkpoint, "--pairs", str(tmp_path / f"{name}.csv"),
                              "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
        assert not results.exists()


@pytest.mark.slow
def test_an_ensemble_row_averages_its_members_calibrated_probabilities(runs, processed, tmp_path, capsys):
    members = [resave(runs / "model_a" / "best.pt", tmp_path / "a" / "best.pt"),
               resave(runs / "model_a" / "best.pt", tmp_path / "a_hot" / "best.pt", temperature=3.0),
               resave(runs / "model_b" / "best.pt", tmp_path / "b" / "best.pt")]
    results = tmp_path / "results.csv"
    # fp32 through the trunk, as the expected side below computes it
    assert evaluate.main(["--checkpoint", *members, "--data", str(processed), "--results", str(results),
                          "--no-cache", "--amp", "off", "--batch-size", "64"]) == 0
    row = rows(results)[0]
    split = load_split(processed, "test")
    probabilities = []
    for path in members:
        model, _, info = load_checkpoint(path)
        log_probs = metrics.evaluate(model, Batches(split, 64, "cpu"))["log_probs"]
        probabilities.append(metrics.temper(log_probs, info["temperature"]).exp())
    mean = torch.stack(probabilities).mean(0)
    assert float(row["Test_Accuracy"]) == pytest.approx(float((mean.argmax(1) == split["labels"]).float().mean()),
                                                        abs=1e-6)
    assert float(row["ECE"]) == pytest.approx(metrics.calibration_error(mean.log(), split["labels"]), abs=1e-5)
    assert row["Experiment_ID"] == "a/best+a_hot/best+b/best" and row["Run"] == "a+a_hot+b"
    assert row["Members"] == "3" and row["Temperature"] == "" and row["Model"] == ""
    assert (tmp_path / "a" / "ensemble_a-best+a_hot-best+b-best_test_confusion.png").exists()
    # one member alone: its own row, as before
    assert evaluate.main(["--checkpoint", members[0], "--data", str(processed), "--results", str(results),
                          "--no-cache", "--amp", "off"]) == 0
    alone = rows(results)[1]
    assert alone["Members"] == "1" and alone["Model"] == "A" and float(alone["Temperature"]) > 0


def test_an_ensemble_of_other_tokenizers_is_refused(runs, processed, tmp_path, capsys):
    foreign = foreign_tokenizer(runs / "model_b" / "best.pt", tmp_path / "foreign" / "best.pt")
    results = tmp_path / "results.csv"
    assert evaluate.main(["--checkpoint", str(runs / "model_a" / "best.pt"), foreign, "--data", str(processed),
                          "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "its tokenizer differs" in err
    assert not results.exists()


def test_help_shows_the_pairs_and_the_ensembles(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.parse_args(["--help"])
    out = capsys.readouterr().out
    options = " ".join(out.split("options:")[1].split())
    assert stop.value.code == 0 and "--pairs mine.csv" in out and "runs/s2/best.pt   # one ensemble row" in out
    assert "--pairs CSV" in options and "--checkpoint PATH [PATH ...]" in options and "--no-detect" in options


def test_labelled_pairs_keep_no_photo(runs, tmp_path, monkeypatch):
    # A phone photo is 36 MB decoded: the split keeps each pair's face crop, not its photo, so
    # that 1,000 photos need no 36 GB. Each photo must be freed before the next one is read.
    recognizer = EmotionRecognizer.load(runs / "model_a" / "best.pt", device="cpu", detect=False)
    for i in range(5):
        Image.fromarray(np.full((400, 300, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "mine.csv").write_text("image,text,label\n" + "".join(f"{i}.png,hi,Happy\n" for i in range(5)))
    photos = []  # a weak reference to each photo read
    alive = []   # how many photos read before are still in memory, as each new one is read
    real_prepare = recognizer.prepare

    def prepare(image, text):
        gc.collect()
        alive.append(sum(photo() is not None for photo in photos))
        prepared = real_prepare(image, text)
        photos.append(weakref.ref(prepared.photo))
        return prepared
    monkeypatch.setattr(recognizer, "prepare", prepare)
    split = evaluate.labelled_split(read_pairs(tmp_path / "mine.csv", LABELLED), recognizer, tmp_path / "mine.csv")
    assert len(split["labels"]) == 5 and len(alive) == 5
    # at most the previous pair's, until the next one is read
    assert max(alive) <= 1, alive


def test_macro_scores_of_labelled_pairs_average_the_classes_in_their_labels(runs, processed, tmp_path, capsys):
    # A set labelled Happy and Sad alone: its macro scores are the mean over those two classes
    # (scikit-learn's labels=), not over seven with the five absent ones counted as 0.
    checkpoint = str(runs / "model_b" / "best.pt")
    _, tokenizer, info = load_checkpoint(checkpoint)
    lines = labelled_pairs(processed, tokenizer, tmp_path / "faces", count=140)
    lines = lines[:1] + [line for line in lines[1:] if line.endswith((",happy", ",sad"))]
    (tmp_path / "two.csv").write_text("\n".join(lines) + "\n")
    results = tmp_path / "results.csv"
    assert evaluate.main(["--checkpoint", checkpoint, "--pairs", str(tmp_path / "two.csv"), "--results",
                          str(results), "--amp", "off"]) == 0
    row = rows(results)[0]
    recognizer = EmotionRecognizer.load(checkpoint, device="cpu")
    pairs = [line.rsplit(",", 1) for line in lines[1:]]
    labels = [info["classes"].index(label.capitalize()) for _, label in pairs]
    predicted = [info["classes"].index(p.label) for p in recognizer.predict_many(
        [(tmp_path / pair.split(",", 1)[0], pair.split(",", 1)[1].strip('"')) for pair, _ in pairs])]
    present = sorted(set(labels))
    assert len(present) == 2 and len(labels) == 40
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, labels=present, average="macro",
                                                               zero_division=0)
    assert float(row["Macro_F1"]) == pytest.approx(f1, abs=1e-6)
    assert float(row["Macro_F1"]) > f1_score(labels, predicted, labels=range(7), average="macro", zero_division=0)
    assert float(row["Macro_Precision"]) == pytest.approx(precision, abs=1e-6)
    assert float(row["Macro_Recall"]) == pytest.approx(recall, abs=1e-6)
    assert row["Classes_Averaged"] == "2"
    assert float(row["Macro_F1_CI_Low"]) <= float(row["Macro_F1"]) <= float(row["Macro_F1_CI_High"])
    # the report's rows and its macro average: the two classes
    out = capsys.readouterr().out
    report = out.split("macro avg")[0]
    assert "Happy" in report and "Sad" in report and "Angry" not in report
    assert f"macro-F1 over the 2 classes in the labels {float(row['Macro_F1']):.4f}" in out


@pytest.mark.slow
def test_an_ensemble_of_long_run_names_gets_a_short_confusion_file_name(runs, tmp_path, capsys):
    # six members of 40-character run names: the joined name passes the file system's 255 bytes
    members = [resave(runs / "model_a" / "best.pt", tmp_path / f"{f'seed{i}':x<40}" / "best.pt") for i in range(6)]
    # three sentences, not a whole split: six members score them in a moment
    (tmp_path / "mine.csv").write_text("image,text,label\n,i am so happy,Happy\n,so sad,Sad\n,how dare you,Angry\n")
    results = tmp_path / "results.csv"
    assert evaluate.main(["--checkpoint", *members, "--pairs", str(tmp_path / "mine.csv"), "--results",
                          str(results)]) == 0
    matrices = list(Path(members[0]).parent.glob("*_confusion.png"))
    assert len(matrices) == 1 and len(matrices[0].name.encode()) <= 255 and matrices[0].name.startswith("ensemble_")
    assert f"confusion matrix: {matrices[0].with_suffix('')}.png" in capsys.readouterr().out
    # the row keeps every member's name
    assert rows(results)[0]["Experiment_ID"] == "+".join(f"{Path(m).parent.name}/best" for m in members)
    # another ensemble that starts with the same members gets a file of its own
    other = evaluate.confusion_stem([f"{f'seed{i}':x<40}/best.pt" for i in (0, 1, 2, 3, 4, 9)], "pairs-mine")
    assert Path(other).name[:40] == matrices[0].name[:40] and Path(other).name != matrices[0].stem
    assert len(Path(other).name.encode()) + 4 <= 255
    # a short name stays readable
    short = evaluate.confusion_stem(["a/best.pt", "b/best.pt"], "test")
    assert Path(short).name == "ensemble_a-best+b-best_test_confusion"

"""prepare_data.py: the pipeline end to end (pairing, tokenizer, idempotence, a killed run, the
unpaired policy, the format version), bad input and the near-copy audit with --dedupe. The
layouts and downloads it reads are tests/test_sources.py's."""
import csv
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import runtime
import prepare_data
from data import load_meta, load_split, load_text_pool, load_tokenizer
from prep import synthetic

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
LABEL_IDS = {"Sad": 0, "Happy": 1, "Angry": 3, "Fear": 4, "Surprise": 5}  # joy -> Happy


def draw_face(path, mode, value):
    pixels = np.full((90, 90), value, dtype=np.uint8)
    pixels[20:40, 20:70] = 255 - value  # something for the resize to keep
    Image.fromarray(pixels).convert(mode).save(path)


def balanced_tree(root, per_class=6, splits=("train", "val", "test"), names=None):
    """split/class/*.png with PNGs stored as L and RGB, and JPEGs, as the downloads mix them."""
    names = names or ["angry", "Disgust", "FEAR", "happiness", "neutral", "sadness", "surprised"]
    for split, (c, name) in itertools.product(splits, enumerate(names)):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            suffix, mode = [(".png", "L"), (".png", "RGB"), (".jpg", "RGB")][i % 3]
            draw_face(folder / f"{i}{suffix}", mode, 20 * c + i)
    return root


def text_csv(path, per_label=30, extra_rows=()):
    """`text,label` with unique sentences (every word also in train, so decoding is exact),
    CRLF line ends; returns {sentence: label id}."""
    combos = itertools.product(WORDS, repeat=3)
    truth = {}
    rows = []
    for label in LABEL_IDS.values():
        for _ in range(per_label):
            sentence = " ".join(next(combos))
            truth[sentence] = label
            rows.append([sentence, label])
    random.Random(0).shuffle(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["text", "label"])
        writer.writerows([*rows, *extra_rows])
    return truth


def prepare(tmp_path, *args, out="processed"):
    return prepare_data.main(["--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / out),
                              "--vocab-size", "300", "--max-len", "16", *args])


def decoded(tokenizer, split):
    return [tokenizer.decode(ids[:n].tolist()) for ids, n in zip(split["input_ids"], split["lengths"])]


@pytest.fixture
def local_data(tmp_path):
    images = balanced_tree(tmp_path / "images")
    truth = text_csv(tmp_path / "texts.csv")
    return images, tmp_path / "texts.csv", truth


def test_pairs_respect_split_and_class(tmp_path, local_data):
    images, texts, truth = local_data
    assert prepare(tmp_path, "--image-dir", str(images), "--text-csv", str(texts)) == 0
    out = tmp_path / "processed"
    meta = load_meta(out)
    tokenizer = load_tokenizer(out)
    pool = load_text_pool(out)
    pool_texts = set(decoded(tokenizer, pool))
    by_split = {}
    for split in data.SPLITS:
        pairs = load_split(out, split)
        by_split[split] = sentences = decoded(tokenizer, pairs)
        assert meta["counts"][split] == {c: 6 for c in data.CLASSES}
        for label, sentence in zip(pairs["labels"].tolist(), sentences):
            name = meta["classes"][label]
            assert sentence in truth
            if name not in ("Disgust", "Neutral"):  # those get any text under 'random'
                assert truth[sentence] == LABEL_IDS[name], (name, sentence)
        if split != "train":
            assert not pool_texts & set(sentences), f"{split} pairs use train texts"
    assert not set(by_split["val"]) & set(by_split["test"])
    assert set(by_split["train"]) <= pool_texts
    vocab = tokenizer.get_vocab()
    assert vocab["[PAD]"] == 0 and meta["unpaired"] == "random"


def test_texts_of_a_class_are_used_evenly():
    labels = np.array([0] * 10)
    choice = prepare_data.pair_texts(labels, ["Angry"] * 4 + ["Sad"] * 3, ["Angry", "Sad"],
                                     [], np.random.default_rng(0))
    counts = np.bincount(choice, minlength=7)
    assert set(choice) == {0, 1, 2, 3} and counts.max() - counts[:4].min() <= 1


def test_tokenizer_sees_only_train_texts(tmp_path):
    balanced_tree(tmp_path / "images", per_class=3)
    rows = [[f"i feel qz{i}word today", i % 6] for i in range(120)]  # one unique word each
    with open(tmp_path / "texts.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows])
    assert prepare(tmp_path, "--image-dir", str(tmp_path / "images"), "--text-csv",
                   str(tmp_path / "texts.csv"), "--vocab-size", "2000") == 0
    out = tmp_path / "processed"
    train_texts = " ".join(decoded(load_tokenizer(out), load_text_pool(out)))
    unique_in_vocab = [w for w in load_tokenizer(out).get_vocab() if w.startswith("qz")
                       and w.endswith("word")]
    # the train texts' words made it in whole, and no val/test word did
    assert len(unique_in_vocab) > 40
    assert all(w in train_texts for w in unique_in_vocab)


def test_same_seed_same_bytes_second_run_skips_force_redoes(tmp_path, local_data, capsys):
    images, texts, _ = local_data
    args = ["--image-dir", str(images), "--text-csv", str(texts)]
    assert prepare(tmp_path, *args) == 0
    assert prepare(tmp_path, *args, out="again") == 0
    shards = sorted(p.name for p in (tmp_path / "processed").glob("*.pt"))
    assert len(shards) == 4
    for name in shards:
        assert (tmp_path / "processed" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    capsys.readouterr()
    assert prepare(tmp_path, *args) == 0
    assert capsys.readouterr().out.count("done already") == 5  # steps 2-6
    assert prepare(tmp_path, *args, "--force") == 0
    assert "done already" not in capsys.readouterr().out


@pytest.mark.slow
def test_same_bytes_in_a_fresh_process(tmp_path):
    """Hash maps are seeded per process: output that follows their order differs between
    runs, never within one. Many equally frequent letter pairs make the tokenizer's merge
    ties matter, and a small vocabulary cuts through them."""
    balanced_tree(tmp_path / "images", per_class=3)
    rng = random.Random(0)
    rows = [[" ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7)))
                      for _ in range(6)), i % 6] for i in range(300)]
    with open(tmp_path / "texts.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows])
    # side by side: the two imports of torch overlap
    runs = [subprocess.Popen([sys.executable, str(ROOT / "prepare_data.py"), "--image-dir",
                              str(tmp_path / "images"), "--text-csv", str(tmp_path / "texts.csv"),
                              "--raw-dir", str(tmp_path / f"raw-{out}"), "--out", str(tmp_path / out),
                              "--vocab-size", "120", "--max-len", "16"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for out in ("one", "two")]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]
    outputs = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_file())
    # 3 shards, texts-train.pt, tokenizer.json, meta.json
    assert len(outputs) == 6
    for name in outputs:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize("problem,expected", [
    ("folder", "unknown class folder 'contempt'"), ("columns", "expected 'text' and 'label'"),
    ("label", "unmapped label '9'"), ("rare", "cannot split the texts 70/15/15")])
def test_bad_input_is_one_clear_line(tmp_path, problem, expected, capsys):
    images = balanced_tree(tmp_path / "images", per_class=2)
    text_csv(tmp_path / "texts.csv")
    if problem == "folder":
        (images / "train" / "contempt").mkdir()
    elif problem == "columns":
        (tmp_path / "texts.csv").write_text("sentence,emotion\nhello,1\n")
    # an unknown label, or a label with one sentence (which cannot be in 3 splits)
    else:
        with open(tmp_path / "texts.csv", "a") as f:
            f.write("a new sentence,9\n" if problem == "label" else "a lone love sentence,2\n")
    assert prepare(tmp_path, "--image-dir", str(images), "--text-csv", str(tmp_path / "texts.csv")) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    if problem == "folder":
        assert "happiness" in err and "surprised" in err  # it lists what is known
    if problem == "label":
        assert "0 sadness -> Sad" in err


def test_killed_run_is_not_taken_for_finished(tmp_path, local_data, monkeypatch):
    images, texts, _ = local_data
    args = ["--image-dir", str(images), "--text-csv", str(texts)]
    assert prepare(tmp_path, *args, out="clean") == 0
    real_atomic_write = prepare_data.atomic_write

    def dies_after_the_train_shard(path):
        # the train shard is written, val is next: killed here
        if path.name == "val-00000.pt":
            raise KeyboardInterrupt
        return real_atomic_write(path)
    monkeypatch.setattr(prepare_data, "atomic_write", dies_after_the_train_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, *args)
    with pytest.raises(runtime.DataError):
        load_split(tmp_path / "processed", "train")  # no meta.json: not a finished data set
    assert (tmp_path / "processed" / "train-00000.pt").exists()
    monkeypatch.setattr(prepare_data, "atomic_write", real_atomic_write)
    assert prepare(tmp_path, *args) == 0
    for name in ("train-00000.pt", "val-00000.pt", "test-00000.pt", "texts-train.pt"):
        assert (tmp_path / "processed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_drop_policy_makes_five_classes(tmp_path, local_data):
    images, texts, _ = local_data
    assert prepare(tmp_path, "--image-dir", str(images), "--text-csv", str(texts),
                   "--unpaired", "drop") == 0
    meta = load_meta(tmp_path / "processed")
    assert meta["classes"] == ["Angry", "Fear", "Happy", "Sad", "Surprise"]
    assert meta["unpaired"] == "drop"
    assert load_split(tmp_path / "processed", "test")["labels"].max() == 4
    assert json.loads((tmp_path / "processed" / "meta.json").read_text())["counts"]["train"]["Sad"] == 6
    assert torch.equal(load_text_pool(tmp_path / "processed")["labels"].unique(), torch.arange(5))


def test_a_file_with_all_seven_classes_pairs_disgust_and_neutral_with_their_own(tmp_path, capsys):
    images = balanced_tree(tmp_path / "images", per_class=3)
    # the label names as files spell them; each sentence starts with a word of its class
    labels = {"Angry": "angry", "Disgust": "Disgust", "Fear": "fear", "Happy": "happy",
              "Neutral": "NEUTRAL", "Sad": "sadness", "Surprise": "surprise"}
    words = {name: f"w{name.lower()}" for name in labels}
    lines = [f"{words[name]} {a} {b};{label}" for name, label in labels.items()
             for a, b in itertools.islice(itertools.product(WORDS, repeat=2), 20)]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n")
    args = ["--image-dir", str(images), "--text-csv", str(tmp_path / "texts.txt")]
    assert prepare(tmp_path, *args) == 0
    assert "7 classes, every class has sentences: --unpaired has nothing to do" in capsys.readouterr().out
    out = tmp_path / "processed"
    meta = load_meta(out)
    assert meta["unpaired"] == prepare_data.ALL_CLASSES_PAIRED
    assert set(meta["text_to_class"].values()) == set(data.CLASSES)
    tokenizer = load_tokenizer(out)
    for split in data.SPLITS:
        pairs = load_split(out, split)
        firsts = [sentence.split()[0] for sentence in decoded(tokenizer, pairs)]
        assert firsts == [words[meta["classes"][label]] for label in pairs["labels"].tolist()], split
    # --unpaired drop has no class to drop
    assert prepare(tmp_path, *args, "--unpaired", "drop") == 0
    assert load_meta(out)["classes"] == data.CLASSES


def test_data_from_another_format_version_is_refused(tmp_path, local_data):
    images, texts, _ = local_data
    assert prepare(tmp_path, "--image-dir", str(images), "--text-csv", str(texts)) == 0
    meta_path = tmp_path / "processed" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "version": 0}))
    with pytest.raises(runtime.DataError, match="prepare_data.py --force"):
        load_split(tmp_path / "processed", "train")


def planted_copies(raw):
    with open(raw / "synthetic" / "planted.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_planted_copies_are_found_and_dedupe_drops_them(tmp_path, capsys):
    """Half of each val and test class are copies of train faces, every kind once per class.
    The audit finds each exact, mirrored, brightness and JPEG copy by name and pairs no
    distinct face; --dedupe drops exactly what it found; the steps it changes are redone,
    not reused, both ways."""
    args = ["--source", "synthetic", "--synthetic-images", "20,12,12", "--synthetic-texts", "900",
            "--synthetic-copies", "0.5"]
    assert prepare(tmp_path, *args) == 0
    out = capsys.readouterr().out
    leaks = load_meta(tmp_path / "processed")["leaks"]
    assert f"warning: {leaks['test_fraction']:.1%} of test images" in out
    assert leaks["remaining"]["counts"] == leaks["counts"]
    assert leaks["remaining"]["test_fraction"] == leaks["test_fraction"]
    planted = planted_copies(tmp_path / "raw")
    originals = {(row["original"], row["copy"]): row["kind"] for row in planted}
    for example in leaks["examples"]:
        if example["files"][0].startswith("train/"):
            assert tuple(example["files"]) in originals, example
            assert example["mirrored"] == (originals[tuple(example["files"])] == "mirrored")
    assert prepare(tmp_path, *args, "--dedupe") == 0
    out = capsys.readouterr().out
    # images, texts, tokenizer: pairing and shards redone
    assert out.count("done already") == 3
    deduped = load_meta(tmp_path / "processed")["leaks"]
    dropped = deduped["dropped_files"]
    for split in ("val", "test"):
        copies = {row["copy"]: row["kind"] for row in planted if row["copy"].startswith(split)}
        assert len(copies) == 42  # 7 classes x 6 copies, each kind once
        for name, kind in copies.items():  # each planted copy, by name
            if kind in ("exact", "mirrored", "brightness", "jpeg"):
                assert name in dropped[split], f"{kind} copy {name} not found"
        for name in dropped[split]:  # and nothing distinct
            assert name in copies, f"{name} is no planted copy"
    assert deduped["dropped"] == {"val": leaks["counts"]["train-val"], "test": len(dropped["test"])}
    assert len(dropped["test"]) >= leaks["counts"]["train-test"]
    assert f"dropped {len(dropped['val'])} val and {len(dropped['test'])} test images" in out
    assert "0 near-copies across splits" in out and "warning" not in out
    assert deduped["remaining"] == {"counts": {"train-val": 0, "train-test": 0, "val-test": 0},
                                    "test_fraction": 0.0}
    counts = load_meta(tmp_path / "processed")["counts"]
    for split in ("val", "test"):
        assert sum(counts[split].values()) == 84 - len(dropped[split])
    assert prepare(tmp_path, *args) == 0  # and back: the full splits again
    assert sum(load_meta(tmp_path / "processed")["counts"]["test"].values()) == 84


def distinct_faces(root, per_class=(4, 2, 2)):
    """split/class/NN.png of synthetic faces that are all distinct (no near-copies)."""
    for split_index, (split, count) in enumerate(zip(data.SPLITS, per_class)):
        for class_index, folder in enumerate(synthetic.CLASS_FOLDERS):
            (root / split / folder).mkdir(parents=True)
            for i in range(count):
                face = synthetic.face_image([12, split_index, class_index, i], class_index)
                Image.fromarray(face).save(root / split / folder / f"{i:02d}.png")
    return root


def test_dedupe_drops_test_faces_copied_from_val(tmp_path, capsys):
    """A clean audit is one line; a test face that copies a val face (and no train face) is
    a leak, and --dedupe drops it too, then reports what is left, not what was found."""
    images = distinct_faces(tmp_path / "images")
    text_csv(tmp_path / "texts.csv")
    args = ["--image-dir", str(images), "--text-csv", str(tmp_path / "texts.csv")]
    assert prepare(tmp_path, *args, out="clean") == 0
    out = capsys.readouterr().out
    assert out.count("near-cop") == 1 and "      0 near-copies across splits\n" in out
    assert load_meta(tmp_path / "clean")["leaks"]["counts"] == {"train-val": 0, "train-test": 0,
                                                                "val-test": 0}
    copied = (images / "val" / "fear" / "01.png").read_bytes()
    (images / "test" / "fear" / "copy.png").write_bytes(copied)
    assert prepare(tmp_path, *args) == 0
    assert "warning: 6.7% of test images have a near-copy in train or val (train-val 0, " \
           "train-test 0, val-test 1)" in capsys.readouterr().out
    assert prepare(tmp_path, *args, "--dedupe") == 0
    out = capsys.readouterr().out
    assert "dropped 0 val and 1 test images" in out and "warning" not in out
    assert "      0 near-copies across splits\n" in out
    meta = load_meta(tmp_path / "processed")
    leaks = meta["leaks"]
    assert leaks["counts"]["val-test"] == 1 and leaks["dropped"] == {"val": 0, "test": 1}
    assert leaks["dropped_files"] == {"val": [], "test": ["test/fear/copy.png"]}
    assert leaks["remaining"]["counts"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert meta["counts"]["test"] == {c: 2 for c in data.CLASSES}

"""prep/sources.py through prepare_data.py: the layouts it accepts (RAF-DB's numbered folders, the
twin CSV, FER2013 as Kaggle unzips it), downloads and credentials, text encodings, and the
files a download carries that are not data."""
import csv
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import prepare_data
from data import load_meta, load_split
from prep import sources, synthetic
from runtime import DataError
from test_prepare_data import WORDS, balanced_tree, prepare, text_csv


def test_rafdb_layout_and_dair_ai_texts(tmp_path):
    raf = balanced_tree(tmp_path / "raf" / "DATASET", per_class=20, splits=("train", "test"),
                        names=[str(i) for i in range(1, 8)])
    (tmp_path / "texts.txt").write_text("".join(f"{' '.join(w)};{name}\n" for w, name in zip(
        itertools.product(WORDS, repeat=3), itertools.cycle(sources.TEXT_LABELS))))
    assert prepare(tmp_path, "--image-dir", str(raf.parent), "--text-csv",
                   str(tmp_path / "texts.txt")) == 0
    counts = load_meta(tmp_path / "processed")["counts"]
    assert counts["train"]["Surprise"] == 17 and counts["val"]["Surprise"] == 3  # 15 % carved
    assert counts["test"]["Neutral"] == 20  # folder 7


def test_messy_csv_and_unreadable_files(tmp_path):
    images = balanced_tree(tmp_path / "images")
    (images / "train" / "angry" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (images / "train" / "angry" / ".DS_Store").write_bytes(b"\x00\x01")  # not data: not skipped
    (images / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class folder
    extra = [["", 1], ["   ", 2], ["", ""], ['said "hi", then left 😀', 1], ['said "hi", then left 😀', 1],
             ["tabs\tand   spaces", 0]]
    truth = text_csv(tmp_path / "texts.csv", extra_rows=extra)
    with open(tmp_path / "indexed.csv", "w", newline="") as f:  # the twin data set's layout
        writer = csv.writer(f)
        writer.writerow(["", "text", "label"])
        writer.writerows([i, t, label] for i, (t, label) in enumerate(truth.items()))
        # an empty row: dropped, its label not judged
        writer.writerow([len(truth), "", ""])
    for name in ("texts.csv", "indexed.csv"):
        assert prepare(tmp_path, "--image-dir", str(images), "--text-csv", str(tmp_path / name),
                       out=f"out-{name}") == 0
    meta = load_meta(tmp_path / "out-texts.csv")
    assert [p.rsplit("/", 1)[1] for p in meta["skipped_files"]] == ["broken.png"]
    assert meta["counts"]["train"]["Angry"] == 6
    assert sum(meta["text_counts"].values()) == len(truth) + 2  # + emoji row and tab row, once each
    assert sum(load_meta(tmp_path / "out-indexed.csv")["text_counts"].values()) == len(truth)


def fer_tree(root, per_class=(6, 2), extra_class=None):
    """FER2013 as Kaggle's msambare/fer2013 unzips: train/ and test/ at the top, lower-case
    class folders of 48x48 gray PNGs; every face distinct noise. Returns {split: {pixels}}."""
    rng = np.random.default_rng(0)
    pixels = {}
    folders = [*synthetic.CLASS_FOLDERS, *([extra_class] if extra_class else [])]
    for split, count in zip(("train", "test"), per_class):
        pixels[split] = set()
        for folder in folders:
            (root / split / folder).mkdir(parents=True)
            for i in range(count):
                face = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                Image.fromarray(face).save(root / split / folder / f"PrivateTest_{i:08d}.png")
                pixels[split].add(face.tobytes())
    return pixels


class FakeKaggle:
    """Stands in for kaggle.api: writes what the real package leaves after unzip=True."""

    def __init__(self, extra_class=None):
        self.calls = []
        self.extra_class = extra_class
        self.pixels = None

    def dataset_download_files(self, slug, path, unzip, quiet):
        assert unzip
        self.calls.append(slug)
        if slug == sources.FACE_SETS["rafdb"]:
            balanced_tree(Path(path) / "balanced-raf-db", per_class=3)
        elif slug == sources.FACE_SETS["fer2013"]:
            self.pixels = fer_tree(Path(path), extra_class=self.extra_class)
        else:
            text_csv(Path(path) / "emotions.csv")


def test_kaggle_download_marker_and_layout(tmp_path, monkeypatch, capsys):
    api = FakeKaggle()
    monkeypatch.setattr(sources, "kaggle_api", lambda: api)
    assert prepare(tmp_path) == 0
    raw = tmp_path / "raw" / "balanced-raf-db-dataset-7575-grayscale"
    assert (raw / ".download-complete").exists() and (raw / "balanced-raf-db" / "train").is_dir()
    assert load_meta(tmp_path / "processed")["sources"] == {
        "kind": "kaggle", "faces": "rafdb", "images": sources.FACE_SETS["rafdb"],
        "texts": sources.KAGGLE_TEXTS}
    assert len(api.calls) == 2
    assert prepare(tmp_path) == 0
    assert len(api.calls) == 2 and "downloaded already" in capsys.readouterr().out


def test_fer2013_download_keeps_its_faces_and_carves_val(tmp_path, monkeypatch):
    """--faces fer2013 downloads msambare/fer2013 (train and test, no val): val is carved
    from train, and at --image-size 48 every stored face is its PNG's pixels, unresized."""
    api = FakeKaggle()
    monkeypatch.setattr(sources, "kaggle_api", lambda: api)
    assert prepare(tmp_path, "--faces", "fer2013", "--image-size", "48") == 0
    assert api.calls == [sources.FACE_SETS["fer2013"], sources.KAGGLE_TEXTS]
    assert (tmp_path / "raw" / "fer2013" / ".download-complete").exists()
    out = tmp_path / "processed"
    meta = load_meta(out)
    assert meta["sources"] == {"kind": "kaggle", "faces": "fer2013", "images": "msambare/fer2013",
                               "texts": sources.KAGGLE_TEXTS}
    assert meta["image_size"] == 48 and meta["counts"]["test"] == {c: 2 for c in data.CLASSES}
    carved = {split: sum(meta["counts"][split].values()) for split in ("train", "val")}
    assert carved["train"] + carved["val"] == 42 and carved["val"] == 7  # 15 %, rounded up
    stored = {split: [face.numpy().tobytes() for face in load_split(out, split)["images"]]
              for split in data.SPLITS}
    assert all(load_split(out, split)["images"].shape[1:] == (48, 48) for split in data.SPLITS)
    assert sorted(stored["train"] + stored["val"]) == sorted(api.pixels["train"])
    assert sorted(stored["test"]) == sorted(api.pixels["test"])


def test_fer2013_unknown_class_folder_is_one_line(tmp_path, monkeypatch, capsys):
    api = FakeKaggle(extra_class="contempt")
    monkeypatch.setattr(sources, "kaggle_api", lambda: api)
    assert prepare(tmp_path, "--faces", "fer2013") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown class folder 'contempt'") and err.count("\n") == 1
    assert "happy" in err and "surprise" in err  # it lists what is known
    assert not (tmp_path / "processed").exists()


@pytest.mark.parametrize("flags,named", [
    (["--source", "synthetic", "--image-dir", "faces"], "--image-dir"),
    (["--source", "synthetic", "--text-csv", "texts.csv"], "--text-csv"),
    (["--source", "synthetic", "--faces", "fer2013"], "--faces"),
    (["--synthetic-images", "10,5,5"], "--synthetic-images"),
    (["--source", "kaggle", "--synthetic-texts", "100"], "--synthetic-texts"),
    (["--text-csv", "texts.csv", "--synthetic-copies", "0.1"], "--synthetic-copies"),
    (["--image-dir", "faces", "--faces", "rafdb"], "--faces"),
    (["--source", "synthetic", "--synthetic-images", "10,5"], "--synthetic-images"),
    (["--source", "synthetic", "--synthetic-copies", "1.5"], "--synthetic-copies"),
    (["--source", "synthetic", "--image-size", "0"], "--image-size")])
def test_flags_the_source_does_not_read_are_refused(tmp_path, monkeypatch, capsys, flags, named):
    """A flag the chosen source would ignore (or a value out of range) is one line and exit 2,
    before anything is downloaded, generated or written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "kaggle_api", lambda: pytest.fail("nothing may be downloaded"))
    assert prepare_data.main(["--raw-dir", "raw", "--out", "processed", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err
    assert list(tmp_path.iterdir()) == []


def test_missing_credentials(tmp_path, monkeypatch, capsys):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / ".kaggle"))
    for name in [m for m in sys.modules if m.split(".")[0] == "kaggle"]:
        # the package reads its config dir on import
        monkeypatch.delitem(sys.modules, name)
    assert prepare(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for way in ("~/.kaggle/kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        assert way in err


def test_texts_in_a_legacy_encoding_are_read_and_noted(tmp_path, capsys):
    balanced_tree(tmp_path / "images", per_class=3)
    truth = text_csv(tmp_path / "texts.csv", extra_rows=[["caf\u00e9 na\u00efve it\u2019s \u20ac5", 1]])
    sentences = (tmp_path / "texts.csv").read_text(encoding="utf-8")
    (tmp_path / "texts.csv").write_bytes(sentences.encode("cp1252"))  # as a spreadsheet saves it
    texts, _, encoding = sources.read_texts(tmp_path / "texts.csv")
    # the header and the ASCII lines read the same either way: they count as UTF-8
    assert encoding == {"utf-8": len(truth) + 1, "cp1252": 1}
    assert "caf\u00e9 na\u00efve it\u2019s \u20ac5" in texts
    assert len(texts) == len(truth) + 1
    assert prepare(tmp_path, "--image-dir", str(tmp_path / "images"), "--text-csv",
                   str(tmp_path / "texts.csv")) == 0
    assert f"texts (utf-8 {len(truth) + 1} lines, cp1252 1 line)" in capsys.readouterr().out
    assert load_meta(tmp_path / "processed")["text_encoding"] == encoding


def test_one_cp1252_line_leaves_the_utf8_lines_intact(tmp_path, capsys):
    """A UTF-8 file with one pasted cp1252 line: only that line is read as cp1252, so the
    emoji and accents of every other line come through as written, not as mojibake."""
    balanced_tree(tmp_path / "images", per_class=3)
    utf8_lines = ["so happy today \U0001f60a caf\u00e9", "\u00e7a va tr\u00e8s bien \u2764\ufe0f"]
    truth = text_csv(tmp_path / "texts.csv", extra_rows=[[line, 1] for line in utf8_lines])
    legacy = "na\u00efve it\u2019s \u20ac5"
    with open(tmp_path / "texts.csv", "ab") as f:
        f.write(f"{legacy},0\r\n".encode("cp1252"))
    texts, _, encoding = sources.read_texts(tmp_path / "texts.csv")
    assert encoding == {"utf-8": len(truth) + 3, "cp1252": 1}
    assert set(utf8_lines) | {legacy} <= set(texts)
    split = sources.split_texts(tmp_path / "texts.csv", seed=0)
    assert set(utf8_lines) | {legacy} <= {t for s in data.SPLITS for t in split[s]["texts"]}
    assert prepare(tmp_path, "--image-dir", str(tmp_path / "images"), "--text-csv",
                   str(tmp_path / "texts.csv")) == 0
    assert f"texts (utf-8 {len(truth) + 3} lines, cp1252 1 line)" in capsys.readouterr().out
    assert load_meta(tmp_path / "processed")["text_encoding"] == encoding


def test_text_file_in_no_known_encoding_is_one_line_naming_the_byte(tmp_path, capsys):
    balanced_tree(tmp_path / "images", per_class=2)
    text_csv(tmp_path / "texts.csv")
    good = (tmp_path / "texts.csv").read_bytes()
    (tmp_path / "texts.csv").write_bytes(good + b"bad \x81 byte,1\r\n")  # 0x81: in neither
    assert prepare(tmp_path, "--image-dir", str(tmp_path / "images"), "--text-csv",
                   str(tmp_path / "texts.csv")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"byte 0x81 at offset {len(good) + 4}" in err and "UTF-8" in err
    out = tmp_path / "processed"
    assert not (out / "meta.json").exists() and not list(out.glob("*.pt"))


def test_macos_shadow_files_are_never_data(tmp_path):
    """A macOS zip unpacks `__MACOSX/<path>/._<name>` beside every file: AppleDouble
    metadata, not images or CSVs. Both sort before the real folders ('_' < 'a')."""
    images = balanced_tree(tmp_path / "download" / "data" / "faces")
    for real in sorted(images.rglob("*.*")):
        shadow = tmp_path / "download" / "__MACOSX" / real.relative_to(tmp_path / "download")
        shadow = shadow.with_name("._" + real.name)
        shadow.parent.mkdir(parents=True, exist_ok=True)
        shadow.write_bytes(b"\x00\x05\x16\x07 Mac OS X attributes")
        (real.parent / shadow.name).write_bytes(shadow.read_bytes())  # unzipped in place too
    texts = tmp_path / "texts"
    (texts / "__MACOSX").mkdir(parents=True)
    truth = text_csv(texts / "emotions.csv")
    (texts / "__MACOSX" / "._emotions.csv").write_bytes(b"\x00\x05\x16\x07\xff\xfe")
    assert prepare(tmp_path, "--image-dir", str(tmp_path / "download"), "--text-csv", str(texts)) == 0
    meta = load_meta(tmp_path / "processed")
    assert meta["skipped_files"] == [] and meta["counts"]["test"] == {c: 6 for c in data.CLASSES}
    assert sum(meta["text_counts"].values()) == len(truth)


# ---- sentence files that name all seven classes --------------------------------------
GOEMOTIONS_LABELS = "anger\ndisgust\nfear\njoy\nneutral\nsadness\nsurprise\n"


def classes_of(labels):
    return [sources.TEXT_TO_CLASS[name] for name in labels]


def test_semicolon_lines_with_disgust_and_neutral_in_any_case(tmp_path):
    (tmp_path / "texts.txt").write_text("that smell is vile;Disgust\nthe bus came;NEUTRAL\n"
                                        "i lost my keys;sad\nwhat a day;Happiness\n")
    texts, labels, _ = sources.read_texts(tmp_path / "texts.txt")
    assert texts == ["that smell is vile", "the bus came", "i lost my keys", "what a day"]
    assert classes_of(labels) == ["Disgust", "Neutral", "Sad", "Happy"]


def test_csv_with_a_quoted_comma(tmp_path):
    with open(tmp_path / "texts.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], ["well, that is gross", "disgust"],
                                 ["so, the meeting is at noon", "Neutral"], ["go away", "angry"]])
    texts, labels, _ = sources.read_texts(tmp_path / "texts.csv")
    assert texts == ["well, that is gross", "so, the meeting is at noon", "go away"]
    assert classes_of(labels) == ["Disgust", "Neutral", "Angry"]


def test_goemotions_tsv_reads_ids_by_labels_txt_and_drops_rows_with_several(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text(GOEMOTIONS_LABELS)
    (tmp_path / "train.tsv").write_text('"Quoted" start, then a comma\t1\teeb1\nboth at once\t0,4\teeb2\n'
                                        "nothing much\t4\teeb3\nso cross\t0\teeb4\n")
    texts, labels, _ = sources.read_texts(tmp_path / "train.tsv")
    assert texts == ['"Quoted" start, then a comma', "nothing much", "so cross"]
    # id 0 is labels.txt's anger here, not the Emotions corpus's sadness
    assert classes_of(labels) == ["Disgust", "Neutral", "Angry"]
    assert "train.tsv: dropped 1 row with several labels" in capsys.readouterr().out


def test_meld_csv_with_extra_columns_commas_and_cp1252(tmp_path):
    rows = ['Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID',
            '1,"Oh, that\x92s gross!",Monica,disgust,negative,0,0',
            '2,Okay.,Ross,neutral,neutral,0,1', '3,"Wow, really?",Joey,Surprise,positive,0,2']
    (tmp_path / "train_sent_emo.csv").write_bytes("\r\n".join(rows).encode("latin-1"))
    texts, labels, encoding = sources.read_texts(tmp_path / "train_sent_emo.csv")
    assert texts == ["Oh, that\u2019s gross!", "Okay.", "Wow, really?"]
    assert classes_of(labels) == ["Disgust", "Neutral", "Surprise"]
    assert encoding == {"utf-8": 3, "cp1252": 1}


def test_numbers_are_the_emotions_corpus_ids_only_where_the_file_says_nothing_else(tmp_path):
    (tmp_path / "texts.txt").write_text("low today;0\nwhat a twist;5\n")
    assert sources.read_texts(tmp_path / "texts.txt")[1] == ["sadness", "surprise"]
    (tmp_path / "texts.csv").write_text("text,label\nmy dear,2\n")
    assert sources.read_texts(tmp_path / "texts.csv")[1] == ["love"]
    # MELD's Emotion column holds names: a number there is no id
    (tmp_path / "meld.csv").write_text("Sr No.,Utterance,Emotion\n1,Hi.,3\n")
    with pytest.raises(DataError, match="meld.csv line 2: unmapped label '3'"):
        sources.read_texts(tmp_path / "meld.csv")


def test_an_unknown_label_is_one_line_naming_the_line_and_the_known_names(tmp_path):
    (tmp_path / "texts.txt").write_text("fine;neutral\nugh;Contempt\n")
    with pytest.raises(DataError) as err:
        sources.read_texts(tmp_path / "texts.txt")
    message = str(err.value)
    assert "texts.txt line 2: unmapped label 'contempt'" in message and "\n" not in message
    assert "disgust -> Disgust" in message and "neutral -> Neutral" in message and "0 sadness -> Sad" in message


def test_a_tsv_without_labels_txt_is_one_line_naming_it(tmp_path):
    (tmp_path / "dev.tsv").write_text("hello there\t4\teeb1\n")
    with pytest.raises(DataError, match="labels.txt") as err:
        sources.read_texts(tmp_path / "dev.tsv")
    assert str(tmp_path / "labels.txt") in str(err.value)

"""Batch mode. demo.py --pairs and --images write one row per face, equal to single predictions;
a bad row is a row with its reason, and the run goes on; a bad CSV is one line that names its
line; a stopped run keeps its rows, and the same command goes on from there, with nothing lost
and nothing twice. The files of batch mode, tested without a model: the predictions file keeps
the whole answers to the pairs as they are now, whatever a stopped run left (a row cut inside a
quoted sentence, a character cut short, a header cut short), and each answer's key changes with
what the answer depends on."""
import codecs
import csv
import errno
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import demo
import recognizer
from data import CLASSES
from recognizer import EmotionRecognizer, Pair, PredictionsFile, answer_key, decoded, whole_rows
from runtime import DataError
from test_demo import PHOTO, predict_json, run_demo
from test_recognizer import foreign_tokenizer, two_faces


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, lines, encoding="utf-8"):
    path.write_bytes("\n".join(lines).encode(encoding) + b"\n")
    return path


@pytest.fixture
def photos(tmp_path):
    """A folder of photos beside the CSV that names them: one face, two faces, none, not an image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(PHOTO, folder / "one.jpg")
    two_faces(folder / "two.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 200).astype(np.uint8), (100, 1))).save(folder / "plain.png")
    (folder / "notes.jpg").write_text("not an image")
    return folder


def batch(capsys, checkpoint, *argv):
    code, out, err = run_demo(capsys, *argv, "--checkpoint", checkpoint)
    return code, out.splitlines(), err


def test_pairs_give_one_row_per_face_equal_to_single_predictions(runs, photos, tmp_path, capsys):
    checkpoint = runs / "model_b" / "best.pt"
    pairs = write_csv(tmp_path / "pairs.csv", [
        "image,text", "photos/one.jpg,what a day", "photos/two.png,so angry at everyone", ",i can't stop smiling",
        "photos/one.jpg,", "photos/plain.png,so calm", "photos/missing.jpg,hi", "photos/notes.jpg,hi",
        ",", '"photos/one.jpg","a sentence, with a comma ' + "and more words " * 20 + '"'])
    out = tmp_path / "predictions.csv"
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out, "--batch-size", "3")
    assert code == 0
    written = rows(out)
    # line 9 holds neither an image nor a text: a blank line, skipped
    assert [row["line"] for row in written] == ["2", "3", "3", "4", "5", "6", "7", "8", "10"]
    assert list(written[0])[:10] == ["line", "image", "text", "face", "faces", "box_x", "box_y", "box_w", "box_h",
                                     "label"]
    assert list(written[0])[10:] == [*CLASSES, "inputs", "truncated", "error", "warning", "key"]
    # each row against the same pair predicted alone
    model = EmotionRecognizer.load(checkpoint, device="cpu")
    for row in written:
        if row["error"]:
            continue
        image = tmp_path / row["image"] if row["image"] else None
        single = model.predict(image, row["text"] or None)
        face = single.faces[int(row["face"]) - 1] if row["face"] else single
        assert {name: float(row[name]) for name in CLASSES} == pytest.approx(face.probabilities, abs=1e-5)
        assert row["label"] == face.label and row["inputs"] == "+".join(single.inputs)
        assert row["truncated"] == str(single.truncated) and int(row["faces"]) == len(single.faces)
        if row["face"]:
            box = single.faces[int(row["face"]) - 1].box
            assert [int(row[k]) for k in ("box_x", "box_y", "box_w", "box_h")] == box
    by_line = {row["line"]: row for row in written}
    assert by_line["4"]["inputs"] == "text" and by_line["4"]["box_x"] == "" and by_line["5"]["inputs"] == "image"
    assert by_line["6"]["faces"] == "0" and by_line["6"]["warning"].startswith("no face found")
    assert "no such file" in by_line["7"]["error"] and "not an image" in by_line["8"]["error"]
    assert by_line["10"]["truncated"] == "True" and "the rest is cut" in by_line["10"]["warning"]
    assert stdout[-1].startswith(f"{out}: 8 pair(s) predicted, 9 row(s) written; 2 row(s) failed (")
    for reason in ("1 no such file", "1 not an image Pillow can read", "1 no face found"):
        assert reason in stdout[-1]
    assert "note: 1 pair(s) without text: the model reads an empty sentence in its place" in err


def test_a_folder_of_photos_with_a_shared_sentence(runs, photos, tmp_path, capsys):
    (photos / "._one.jpg").write_bytes(b"\0\5\26\7")  # a macOS shadow file: not a photo
    (photos / "readme.txt").write_text("not a photo either")
    out = tmp_path / "folder.csv"
    code, stdout, err = batch(capsys, runs / "model_a" / "best.pt", "--images", photos, "--text", "so happy",
                              "--out", out)
    written = rows(out)
    assert code == 0
    assert [row["image"] for row in written] == ["notes.jpg", "one.jpg", "plain.png", "two.png", "two.png"]
    assert {row["text"] for row in written} == {"so happy"} and {row["line"] for row in written} == {""}
    assert "not an image" in written[0]["error"] and written[1]["inputs"] == "image+text"
    assert stdout[-1].startswith(f"{out}: 4 pair(s) predicted, 5 row(s) written; 1 row(s) failed")


def test_a_bad_csv_is_one_line_naming_the_line(runs, tmp_path, capsys):
    checkpoint = runs / "model_a" / "best.pt"
    out = tmp_path / "predictions.csv"
    no_text = write_csv(tmp_path / "no_text.csv", ["image,caption", "a.jpg,hi"])
    latin = write_csv(tmp_path / "latin.csv", ["image,text", "a.jpg,hi", "b.jpg,déjà vu"], encoding="latin-1")
    for pairs, words in [(no_text, "line 1 (the header) has no text column"), (latin, "line 3 is not UTF-8"),
                         (tmp_path / "none.csv", "cannot read")]:
        code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out)
        assert code == 2 and stdout == [] and len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not out.exists()
    for argv, words in [(["--pairs", "p.csv", "--image", "x.jpg"], "leave out --image"),
                        (["--pairs", "p.csv", "--images", "dir"], "two runs"),
                        (["--pairs", "p.csv", "--json"], "for one prediction"),
                        (["--text", "hi", "--out", "x.csv"], "--out names what")]:
        with pytest.raises(SystemExit) as stop:
            demo.parse_args(argv)
        assert stop.value.code == 2 and words in capsys.readouterr().err


def test_a_stopped_run_goes_on_where_it_stopped(runs, photos, tmp_path, capsys, monkeypatch):
    checkpoint = runs / "model_b" / "best.pt"
    lines = ["image,text"] + [f"photos/{name},sentence number {i}"
                              for i, name in enumerate(["one.jpg", "two.png", "plain.png", "notes.jpg"] * 2)]
    pairs = write_csv(tmp_path / "pairs.csv", lines)
    whole = tmp_path / "whole.csv"
    assert batch(capsys, checkpoint, "--pairs", pairs, "--out", whole, "--batch-size", "2")[0] == 0
    # Ctrl-C while the fifth pair is read: the pairs of the first sorted window (SORTED_BATCHES
    # batches of one pair) are in the file
    real = recognizer.face_crops
    calls = []

    def stop_at_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recognizer, "face_crops", stop_at_the_fifth)
    out = tmp_path / "predictions.csv"
    assert recognizer.SORTED_BATCHES == 4
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out, "--batch-size", "1")
    assert code == 130 and err[-1].startswith("stopped: 5 row(s) are in") and len(calls) == 5
    assert [row["line"] for row in rows(out)] == ["2", "3", "3", "4", "5"]
    monkeypatch.setattr(recognizer, "face_crops", real)
    # a run killed while writing a pair's rows: its last line cut short
    text = out.read_text()
    out.write_text(text + text.splitlines()[2][:30])
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out, "--batch-size", "2")
    assert code == 0 and "4 pair(s) predicted" in stdout[-1] and "4 pair(s) there already" in stdout[-1]
    resumed = rows(out)
    same_rows(resumed, rows(whole))
    # once more: nothing left to do, nothing written twice
    assert batch(capsys, checkpoint, "--pairs", pairs, "--out", out)[1][-1].startswith(f"{out}: 0 pair(s) predicted")
    assert rows(out) == resumed


def same_rows(mine, theirs):
    """The same rows, their probabilities within 1e-5 (another batch, other float rounding)."""
    assert len(mine) == len(theirs)
    for row, other in zip(mine, theirs):
        assert ({k: v for k, v in row.items() if k not in CLASSES}
                == {k: v for k, v in other.items() if k not in CLASSES})
        assert [float(row[c] or 0) for c in CLASSES] == pytest.approx([float(other[c] or 0) for c in CLASSES], abs=1e-5)


def test_a_pair_cut_short_is_predicted_again(runs, photos, tmp_path, capsys):
    # The two faces' rows of one pair, the second never written: that pair is done again, whole.
    checkpoint = runs / "model_a" / "best.pt"
    pairs = write_csv(tmp_path / "pairs.csv", ["image,text", "photos/one.jpg,hi", "photos/two.png,hi"])
    out = tmp_path / "predictions.csv"
    assert batch(capsys, checkpoint, "--pairs", pairs, "--out", out)[0] == 0
    whole = rows(out)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out)
    assert code == 0 and "1 pair(s) predicted, 2 row(s) written, 1 pair(s) there already" in stdout[-1]
    same_rows(rows(out), whole)
    # a file of another command is refused, untouched
    other = write_csv(tmp_path / "other.csv", ["a,b", "1,2"])
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", other)
    assert code == 2 and len(err) == 1 and "pass another --out" in err[0] and other.read_text() == "a,b\n1,2\n"


def sorted_rows(path):
    return sorted(rows(path), key=lambda row: (int(row["line"] or 0), row["image"], row["face"]))


def test_an_odd_photo_stays_with_its_row_and_the_batch_goes_on(runs, photos, tmp_path, capsys, monkeypatch):
    # A sliver (1000 x 1) crashed OpenCV's resize and the whole batch with it, on every rerun
    # (issue 54); any other failure on one photo must stay with that photo too.
    Image.fromarray(np.full((1, 1000), 128, np.uint8)).save(photos / "sliver.png")
    Image.fromarray(np.full((123, 123), 128, np.uint8)).save(photos / "odd.png")
    real = recognizer.face_crops

    def fail_on_odd(gray, *args, **kwargs):
        if gray.shape == (123, 123):
            raise RuntimeError("OpenCV(4.10.0) resize.cpp:4152: error: (-215:Assertion failed)\n"
                               " in function 'resize'\n")
        return real(gray, *args, **kwargs)

    monkeypatch.setattr(recognizer, "face_crops", fail_on_odd)
    pairs = write_csv(tmp_path / "pairs.csv", ["image,text", "photos/one.jpg,hi", "photos/sliver.png,hi",
                                               "photos/odd.png,hi", "photos/two.png,hi"])
    out = tmp_path / "predictions.csv"
    checkpoint = runs / "model_b" / "best.pt"
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out)
    written = rows(out)
    assert code == 0 and [row["line"] for row in written] == ["2", "3", "4", "5", "5"]
    assert [bool(row["label"]) for row in written] == [True, False, False, True, True]
    # the photo named as the image column names it
    assert written[1]["error"].startswith("photos/sliver.png is too small to hold a face (1000x1 pixels")
    assert written[2]["error"] == ("photos/odd.png could not be predicted (RuntimeError: OpenCV(4.10.0) "
                                   "resize.cpp:4152: error: (-215:Assertion failed) in function 'resize')")
    assert "2 row(s) failed (1 too small to hold a face, 1 could not be predicted)" in stdout[-1]
    # the rerun finishes: nothing left to do
    assert batch(capsys, checkpoint, "--pairs", pairs, "--out", out)[1][-1].startswith(f"{out}: 0 pair(s) predicted")
    assert rows(out) == written


@pytest.mark.slow
def test_an_answer_is_kept_only_while_its_input_is_the_same(runs, photos, tmp_path, capsys):
    # The resume key was (line, image): another sentence, an edited cell, another folder with the
    # same names or another checkpoint kept the old answers and exited 0 (issue 54). Each run
    # into --out must leave what a run into a new file writes.
    model_a, model_b = runs / "model_a" / "best.pt", runs / "model_b" / "best.pt"
    out, fresh = tmp_path / "predictions.csv", tmp_path / "fresh.csv"

    def resumed(checkpoint, *inputs):
        """-> the closing line and stderr of a run into `out`, checked against a run into a new file."""
        fresh.unlink(missing_ok=True)
        code, stdout, err = batch(capsys, checkpoint, *inputs, "--out", out)
        assert code == 0 and batch(capsys, checkpoint, *inputs, "--out", fresh)[0] == 0
        same_rows(sorted_rows(out), sorted_rows(fresh))
        return stdout[-1], err

    furious = ["--images", photos, "--text", "I am furious"]
    lovely = ["--images", photos, "--text", "what a lovely day"]
    assert "4 pair(s) predicted" in resumed(model_b, *furious)[0]
    closing, err = resumed(model_b, *lovely)
    assert "4 pair(s) predicted" in closing and f"note: {out} held 4 answer(s) to inputs that are not these" in err[0]
    assert "0 pair(s) predicted, 5 row(s) written, 4 pair(s) there already" not in closing
    assert "0 pair(s) predicted" in resumed(model_b, *lovely)[0]
    # another folder, the same names, one photo changed
    other = tmp_path / "other"
    shutil.copytree(photos, other)
    shutil.copy(photos / "two.png", other / "plain.png")
    closing = resumed(model_b, "--images", other, "--text", "what a lovely day")[0]
    assert "1 pair(s) predicted" in closing and "3 pair(s) there already" in closing
    assert "4 pair(s) predicted" in resumed(model_a, "--images", other, "--text", "what a lovely day")[0]
    assert "4 pair(s) predicted" in resumed(model_a, "--images", other, "--text", "what a lovely day",
                                            "--no-detect")[0]
    # a CSV, then a cell edited, then a line put in before the others
    lines = ["image,text", "photos/one.jpg,so happy", "photos/two.png,so sad", "photos/plain.png,so calm"]
    pairs = write_csv(tmp_path / "pairs.csv", lines)
    assert "3 pair(s) predicted" in resumed(model_a, "--pairs", pairs)[0]
    write_csv(pairs, [*lines[:2], "photos/two.png,so very sad", lines[3]])
    closing = resumed(model_a, "--pairs", pairs)[0]
    assert "1 pair(s) predicted" in closing and "2 pair(s) there already" in closing
    write_csv(pairs, [lines[0], "photos/plain.png,first", *lines[1:]])
    # every row now starts a line further down: its line column would be wrong
    assert "4 pair(s) predicted" in resumed(model_a, "--pairs", pairs)[0]


@pytest.mark.slow
def test_a_run_cut_inside_a_quoted_sentence_or_a_character_goes_on(runs, photos, tmp_path, capsys):
    # A run stopped after a newline inside a quoted sentence left a short row counted as done,
    # and every row appended after it inside the open quote; one stopped inside a character of
    # several bytes left a file that no resume could read, "line N is not UTF-8" (issue 54).
    checkpoint = runs / "model_a" / "best.pt"
    sentences = ["a first line\nand a second", "so happy 😀 today\nreally", "third\n\nafter a blank line",
                 "the last one"]
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "text"], *[["photos/one.jpg", sentence] for sentence in sentences]])
    whole = tmp_path / "whole.csv"
    assert batch(capsys, checkpoint, "--pairs", pairs, "--out", whole)[0] == 0
    data = whole.read_bytes()
    second = data.index(b"so happy")
    out = tmp_path / "predictions.csv"
    for cut in (data.index(b"\n", second) + 1, data.index("😀".encode()) + 2):
        out.write_bytes(data[:cut])
        code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out)
        assert code == 0 and "3 pair(s) predicted" in stdout[-1] and "1 pair(s) there already" in stdout[-1]
        same_rows(rows(out), rows(whole))


def test_a_full_disk_is_one_line_and_keeps_the_rows_written(runs, photos, tmp_path, capsys, monkeypatch):
    checkpoint = runs / "model_a" / "best.pt"
    pairs = write_csv(tmp_path / "pairs.csv", ["image,text"] + [f"photos/one.jpg,sentence {i}" for i in range(4)])
    whole = tmp_path / "whole.csv"
    assert batch(capsys, checkpoint, "--pairs", pairs, "--out", whole)[0] == 0
    real_open = open

    class FullDisk:
        """A file on a disk that fills while the rows of "sentence 2" are written: half of them
        reach it, and a later write or close fails the same way."""
        def __init__(self, file):
            self.file = file
            self.full = False

        def __getattr__(self, name):
            return getattr(self.file, name)

        def write(self, text):
            if self.full or "sentence 2" in text:
                self.file.write(text[:len(text) // 2])
                self.file.flush()
                self.full = True
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def close(self):
            self.file.close()
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if "a" in mode else file

    monkeypatch.setattr(recognizer, "open", open_on_a_full_disk, raising=False)
    out = tmp_path / "predictions.csv"
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out)
    assert code == 2 and stdout == [] and err == [f"error: cannot write {out}: No space left on device"]
    monkeypatch.undo()
    code, stdout, err = batch(capsys, checkpoint, "--pairs", pairs, "--out", out)
    assert code == 0 and "2 pair(s) predicted" in stdout[-1] and "2 pair(s) there already" in stdout[-1]
    same_rows(rows(out), rows(whole))


@pytest.mark.slow
def test_demo_with_an_ensemble(runs, tmp_path, capsys):
    paths = [runs / "model_a" / "best.pt", runs / "model_b" / "best.pt"]
    alone = [predict_json(path, PHOTO, "what a day", capsys)["probabilities"] for path in paths]
    code, out, err = run_demo(capsys, "--image", PHOTO, "--text", "what a day", "--json", "--checkpoint", *paths)
    assert code == 0
    mean = {name: (alone[0][name] + alone[1][name]) / 2 for name in CLASSES}
    assert json.loads(out)["probabilities"] == pytest.approx(mean, abs=1e-6)
    foreign = foreign_tokenizer(paths[1], tmp_path / "foreign.pt")
    code, out, err = run_demo(capsys, "--image", PHOTO, "--checkpoint", paths[0], foreign)
    assert code == 2 and out == "" and len(err) == 1 and "its tokenizer differs" in err[0]
    with pytest.raises(SystemExit) as stop:
        demo.parse_args(["--image", "x.jpg", "--explain", "x.png", "--checkpoint", "a.pt", "b.pt"])
    assert stop.value.code == 2


# ---- the files of batch mode, without a model --------------------------------------

def test_a_cut_text_is_read_to_its_last_whole_row():
    records = [["line", "text"], ["2", "one\nline more"], ["3", 'a "quoted" word, and\r\na comma'],
               ["", "a lone\rreturn"], ["", "\U0001F600 done"], ["4", ""]]
    texts = []
    for record in records:
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerow(record)
        texts.append(out.getvalue())
    text = "".join(texts)
    ends = [len("".join(texts[:count])) for count in range(len(texts) + 1)]
    for cut in range(len(text) + 1):
        count = max(count for count, end in enumerate(ends) if end <= cut)
        assert whole_rows(text[:cut]) == (records[:count], text[:ends[count]]), cut


def test_a_character_cut_short_at_the_end_is_dropped(tmp_path):
    path = tmp_path / "cut.csv"
    data = "a,b\r\n1,déjà \U0001F600".encode()
    for cut in range(len(data) - 3, len(data)):  # inside the emoji's four bytes
        path.write_bytes(data[:cut])
        assert decoded(path, cut=True) == "a,b\r\n1,déjà "
        with pytest.raises(DataError, match="line 2 is not UTF-8"):
            decoded(path)
    # a bad byte before the end is still one, and a byte-order mark does not move its line
    path.write_bytes(codecs.BOM_UTF8 + b"a\n\xff\nb")
    with pytest.raises(DataError, match="line 2 is not UTF-8 \\(byte 0xff\\)"):
        decoded(path, cut=True)


def test_the_key_changes_with_what_the_answer_depends_on(tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"one photo")
    pair = Pair(2, "a.jpg", photo, "hi")
    key = answer_key(pair, "model")
    assert answer_key(Pair(2, "a.jpg", photo, "hi"), "model") == key
    others = {answer_key(other, "model") for other in (Pair(3, "a.jpg", photo, "hi"), Pair(2, "b/a.jpg", photo, "hi"),
                                                       Pair(2, "a.jpg", photo, "ho"), Pair(2, "a.jpg", photo, None))}
    others.add(answer_key(pair, "another model"))
    photo.write_bytes(b"another photo")
    others.add(answer_key(pair, "model"))
    photo.unlink()
    others.add(answer_key(pair, "model"))
    assert len(others) == 7 and key not in others


def test_the_predictions_file_keeps_the_whole_answers_to_these_pairs(tmp_path):
    # error rows (one per pair) need no model
    path = tmp_path / "predictions.csv"
    pairs = [Pair(2, "", None, "one\nline more"), Pair(3, "", None, "two \U0001F600 more"), Pair(4, "", None, "three")]

    def opened(these, model="model"):
        """-> (todo, dropped) of the file opened for the pairs `these`."""
        with PredictionsFile(path, CLASSES, these, model) as out:
            return out.todo, out.dropped

    with PredictionsFile(path, CLASSES, pairs, "model") as out:
        assert out.todo == pairs and out.dropped == 0
        for pair in pairs[:2]:
            out.append(pair, DataError(f"failed on line {pair.line}"))
    data = path.read_bytes()
    header = data.index(b"\r\n") + 2
    first = data.index(b"\r\n", data.index(b"line more")) + 2
    assert opened(pairs) == (pairs[2:], 0) and path.read_bytes() == data
    # cut after a newline inside the first sentence, inside the emoji, or inside the header
    newline, emoji = data.index(b"one\n") + 4, data.index("\U0001F600".encode()) + 1
    for cut, todo, kept in [(newline, pairs, header), (emoji, pairs[1:], first), (10, pairs, header)]:
        path.write_bytes(data[:cut])
        assert opened(pairs) == (todo, 0) and path.read_bytes() == data[:kept]
    # another checkpoint: every answer dropped; another sentence: its answer dropped
    path.write_bytes(data)
    assert opened(pairs, "another model") == (pairs, 2) and path.read_bytes() == data[:header]
    path.write_bytes(data)
    edited = [pairs[0], Pair(3, "", None, "two, edited"), pairs[2]]
    assert opened(edited) == (edited[1:], 1) and path.read_bytes() == data[:first]
    # a file of another kind is refused, untouched
    path.write_bytes(b"a,b\r\n1,2\r\n")
    with pytest.raises(DataError, match="pass another --out"):
        opened(pairs)
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"

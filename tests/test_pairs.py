"""pairs.py without a model: the predictions file keeps the whole answers to the pairs as they
are now, whatever a stopped run left (a row cut inside a quoted sentence, a character cut
short, a header cut short), and each answer's key changes with what the answer depends on."""
import codecs
import csv
import io

import pytest

from data import CLASSES
from pairs import Pair, PredictionsFile, answer_key, decoded, whole_rows
from runtime import DataError


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

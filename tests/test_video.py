"""Video: demo.py --video and EmotionRecognizer.predict_video on videos written here with
cv2.VideoWriter from synthetic faces, with subtitles at known times. The rows follow the sampled
times and carry the line shown at each; a face keeps one id; the per-line file averages the
right frames; a stopped run goes on without a duplicate or a lost frame; a stub camera streams;
every bad input is one line. The subtitle reader and the face tracker are tested alone first."""
import csv

import cv2
import numpy as np
import pytest
from PIL import Image

import demo
import images
from images import FaceTracker, Line, line_at, read_subtitles
from prep.synthetic import face_image
from recognizer import EmotionRecognizer
from runtime import DataError
from test_demo import run_demo

RATE = 10  # frames per second of the test videos
SRT = """1
00:00:00,500 --> 00:00:01,500
I am <i>so</i> happy today

2
00:00:02,000 --> 00:00:02,800
this is awful
"""
LINES = [(0.5, 1.5, "I am so happy today"), (2.0, 2.8, "this is awful")]


def frames(seconds, faces, size=(360, 240)):
    """uint8 BGR frames: each face (seed, class) enlarged to 120 px at its own place, moving a pixel
    per frame; a face is left out of the frames whose index is in its `gone` set."""
    out = []
    for i in range(round(seconds * RATE)):
        frame = np.full((size[1], size[0]), 128, np.uint8)
        for k, (seed, cls) in enumerate(faces):
            face = np.array(Image.fromarray(face_image(seed, cls)).resize((120, 120)))
            x = 20 + 170 * k + i % 5
            frame[60:180, x:x + 120] = face
        out.append(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    return out


def write_video(path, seconds=3, faces=((0, 3), (2, 5)), size=(360, 240)):
    codec = "mp4v" if str(path).endswith(".mp4") else "MJPG"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), RATE, size)
    for frame in frames(seconds, faces, size):
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 3-second video of two faces at 10 frames per second, and its subtitles."""
    root = tmp_path_factory.mktemp("clip")
    (root / "clip.srt").write_text(SRT)
    return write_video(root / "clip.avi"), root / "clip.srt"


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def video(capsys, checkpoint, *argv):
    return run_demo(capsys, "--checkpoint", checkpoint, "--video", *argv)


# ---- the parts alone -----------------------------------------------------------------
def test_srt_and_webvtt_give_the_same_lines(tmp_path):
    (tmp_path / "a.srt").write_text(SRT)
    (tmp_path / "a.vtt").write_text("WEBVTT\n\nintro\n00:02.000 --> 00:02.800 align:start\nthis is awful\n\n"
                                    "00:00:00.500 --> 00:00:01.500\nI am <i>so</i>\nhappy today\n")
    for name in ("a.srt", "a.vtt"):
        assert [(line.start, line.end, line.text) for line in read_subtitles(tmp_path / name)] == LINES
    lines = read_subtitles(tmp_path / "a.srt")
    assert line_at(lines, 0.5).text == LINES[0][2] and line_at(lines, 1.5) is None and line_at(lines, 0.4) is None


@pytest.mark.parametrize("text, where", [("1\n00:00:01,000 -> 00:00:02,000\nhi\n", None),
                                         ("1\n00:00:01,000 --> 00:00:02\nhi\n", "line 2"),
                                         ("1\n00:00:03,000 --> 00:00:02,000\nhi\n", "line 2"),
                                         ("just words\n", None)])
def test_broken_subtitles_are_one_line(tmp_path, text, where):
    (tmp_path / "bad.srt").write_text(text)
    with pytest.raises(DataError) as err:
        read_subtitles(tmp_path / "bad.srt")
    assert "bad.srt" in str(err.value) and (where is None or where in str(err.value))


def test_a_face_keeps_its_id_and_a_new_face_gets_a_new_one():
    tracker = FaceTracker()
    assert tracker.ids([(0, 0, 50, 50), (100, 0, 50, 50)]) == [1, 2]
    # moved a little, listed in the other order
    assert tracker.ids([(104, 2, 50, 50), (3, 1, 50, 50)]) == [2, 1]
    # face 2 missed for a frame, then back; a third face comes
    assert tracker.ids([(5, 1, 50, 50)]) == [1]
    assert tracker.ids([(6, 1, 50, 50), (106, 2, 50, 50), (200, 100, 40, 40)]) == [1, 2, 3]
    # gone for longer than MISSED_FRAMES: a new face
    for _ in range(FaceTracker.MISSED_FRAMES):
        tracker.ids([(6, 1, 50, 50)])
    assert tracker.ids([(6, 1, 50, 50), (106, 2, 50, 50)]) == [1, 4]


# ---- demo.py --video -------------------------------------------------------------------
def test_rows_follow_the_sampled_times_with_their_lines_and_ids(runs, clip, tmp_path, capsys):
    checkpoint = runs / "model_b" / "best.pt"
    clip_video, subtitles = clip
    out = tmp_path / "timeline.csv"
    code, stdout, err = video(capsys, checkpoint, clip_video, "--subtitles", subtitles, "--out", out,
                              "--plot", tmp_path / "timeline.png", "--annotate", tmp_path / "boxes.mp4")
    assert code == 0, err
    timeline = rows(out)
    times = sorted({float(row["time"]) for row in timeline})
    assert times == pytest.approx([i / 5 for i in range(15)])  # 5 per second over 3 s
    assert {row["frame"] for row in timeline} == {str(2 * i) for i in range(15)}
    for row in timeline:
        assert row["text"] == (line_at([Line(*line) for line in LINES], float(row["time"])) or Line(0, 0, "")).text
    # two faces, found in every frame, each keeping its id: the left one is face 1
    assert len(timeline) == 30 and all(row["faces"] == "2" for row in timeline)
    ids = {row["face"]: {int(row["box_x"]) < 180 for r in timeline if r["face"] == row["face"]} for row in timeline}
    assert ids == {"1": {True}, "2": {False}}
    # one frame's answers through the Python API are the rows' answers
    recognizer = EmotionRecognizer.load(checkpoint, "cpu")
    first = next(recognizer.predict_video(clip_video, subtitles, fps=5))
    assert [face.id for face in first.faces] == [1, 2] or [face.id for face in first.faces] == [2, 1]
    for face in first.faces:
        row = next(r for r in timeline if r["frame"] == "0" and r["face"] == str(face.id))
        assert face.label == row["label"] and face.probabilities["Happy"] == pytest.approx(float(row["Happy"]),
                                                                                           abs=1e-5)
    # the per-line file: the mean over the frames shown during each line, per face
    per_line = rows(tmp_path / "timeline-lines.csv")
    assert [(row["text"], row["face"]) for row in per_line] == [(text, face) for *_, text in LINES
                                                                 for face in ("1", "2")]
    for row in per_line:
        shown = [r for r in timeline if r["face"] == row["face"] and float(row["start"]) <= float(r["time"])
                 < float(row["end"])]
        assert int(row["frames"]) == len(shown) == (5 if row["start"] == "0.500" else 4)
        assert float(row["Sad"]) == pytest.approx(np.mean([float(r["Sad"]) for r in shown]), abs=1e-5)
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert cv2.VideoCapture(str(tmp_path / "boxes.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == 15


@pytest.mark.slow
def test_a_stopped_run_goes_on_without_a_duplicate_or_a_lost_frame(runs, clip, tmp_path, capsys):
    checkpoint = runs / "model_a" / "best.pt"
    clip_video, subtitles = clip
    whole = tmp_path / "whole.csv"
    assert video(capsys, checkpoint, clip_video, "--subtitles", subtitles, "--out", whole)[0] == 0
    text = whole.read_bytes()
    # cut inside frame 6's second row, and after frame 6's first row (a frame cut short)
    for cut in (text.index(b"\n0.600,6,2,2,") + 9, text.index(b"\n0.600,6,2,2,") + 1):
        out = tmp_path / "resumed.csv"
        out.write_bytes(text[:cut])
        code, _, err = video(capsys, checkpoint, clip_video, "--subtitles", subtitles, "--out", out)
        assert code == 0 and any("going on after 0.400 s" in line for line in err), err
        assert rows(out) == rows(whole)
    # the same command once more: nothing to add
    assert video(capsys, checkpoint, clip_video, "--subtitles", subtitles, "--out", out)[0] == 0
    assert rows(out) == rows(whole)
    # another --fps: the rows answer another sampling, and are dropped
    code, _, err = video(capsys, checkpoint, clip_video, "--subtitles", subtitles, "--out", out, "--fps", "2")
    assert code == 0 and any("dropped" in line for line in err)
    assert sorted({float(row["time"]) for row in rows(out)}) == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])


class StubCamera:
    """cv2.VideoCapture for camera 0 that serves 1.5 s of frames at about 20 per second, and can
    be told to raise KeyboardInterrupt (Ctrl-C) at one of them."""
    frames = frames(1.5, ((0, 3),))
    stop_at = None

    def __init__(self, source):
        self.opened = source == 0
        self.index = -1

    def isOpened(self):
        return self.opened

    def get(self, prop):
        return 0.0  # a camera that does not say its rate

    def grab(self):
        self.index += 1
        if self.index == self.stop_at:
            raise KeyboardInterrupt
        import time
        time.sleep(0.05)
        return self.index < len(self.frames)

    def retrieve(self):
        return True, self.frames[self.index]

    def release(self):
        pass


@pytest.mark.slow
def test_a_camera_streams_rows_until_it_stops_or_ctrl_c(runs, tmp_path, capsys, monkeypatch):
    checkpoint = runs / "model_b" / "best.pt"
    monkeypatch.setattr(cv2, "VideoCapture", StubCamera)
    recognizer = EmotionRecognizer.load(checkpoint, "cpu")
    stream = recognizer.predict_video(0, fps=5)
    first = next(stream)  # the first frame comes before the camera has served the rest
    assert first.index == 0 and len(first.faces) == 1 and first.text is None
    later = list(stream)
    # 15 frames at about 20 per second, sampled at 5 per second: at most one in each fifth of a
    # second of the camera's time (which the model's own time stretches)
    slots = [int(frame.time / 0.2 + 1e-6) for frame in [first, *later]]
    assert len(slots) >= 2 and slots == sorted(set(slots))
    monkeypatch.setattr(StubCamera, "stop_at", 12)
    out = tmp_path / "camera.csv"
    code, stdout, err = video(capsys, checkpoint, "0", "--out", out, "--plot", tmp_path / "camera.png")
    assert code == 0, err
    kept = rows(out)
    assert len(kept) >= 2 and {row["face"] for row in kept} == {"1"} and (tmp_path / "camera.png").exists()
    # a camera run does not add to an earlier one
    code, _, err = video(capsys, checkpoint, "0", "--out", out)
    assert code == 2 and err == [f"error: {out} exists: a camera run starts a new timeline, give another --out"]


def test_a_video_without_a_face_has_rows_that_say_so(runs, tmp_path, capsys):
    blank = write_video(tmp_path / "blank.avi", seconds=1, faces=())
    out = tmp_path / "blank.csv"
    code, stdout, err = video(capsys, runs / "model_b" / "best.pt", blank, "--out", out)
    assert code == 0 and "5 frame(s) sampled, 5 without a face" in stdout
    assert [(row["face"], row["warning"]) for row in rows(out)] == [("", "no face found")] * 5


def test_bad_video_input_is_one_line(runs, clip, tmp_path, capsys, monkeypatch):
    checkpoint = runs / "model_b" / "best.pt"
    clip_video, subtitles = clip
    (tmp_path / "notes.mp4").write_text("not a video")
    (tmp_path / "broken.srt").write_text("1\n00:00:01,000 --> 00:00:0x,000\nhi\n")
    (tmp_path / "long.srt").write_text(SRT + "\n3\n00:00:09,000 --> 00:00:10,000\nlate\n")
    out = tmp_path / "t.csv"
    for argv, message in [
            ((tmp_path / "missing.mp4",), f"error: {tmp_path / 'missing.mp4'}: no such video file"),
            ((tmp_path / "notes.mp4",), f"error: {tmp_path / 'notes.mp4'} is not a video OpenCV can read"),
            ((clip_video, "--subtitles", tmp_path / "broken.srt"),
             f"error: {tmp_path / 'broken.srt'}, line 2: a broken timestamp '00:00:01,000 --> 00:00:0x,000' "
             "(expected 00:00:01,000 --> 00:00:02,500)")]:
        code, stdout, err = video(capsys, checkpoint, *argv, "--out", out)
        assert (code, stdout, err) == (2, "", [message])
        assert not out.exists()  # nothing half-written
    for argv, message in ((["--fps", "0"], "--fps must be above 0"), (["--no-detect"], "leave out --no-detect"),
                          (["--text", "hi"], "leave out --image and --text")):
        with pytest.raises(SystemExit):
            demo.parse_args(["--video", str(clip_video), *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--image", "a.png", "--subtitles", str(subtitles)])
    assert "--subtitles goes with --video" in capsys.readouterr().err
    # warnings: subtitles past the end, --fps above the video's rate (every frame is sampled)
    code, _, err = video(capsys, checkpoint, clip_video, "--subtitles", tmp_path / "long.srt", "--fps", "50",
                         "--out", out)
    assert code == 0
    assert "warning: --fps 50 is above the video's own rate: sampling every frame (10 per second)" in err
    assert any(line.startswith("warning: the subtitles run to 10.0 s, past the video's end at 3.0 s") for line in err)
    assert len({row["frame"] for row in rows(out)}) == 30
    # a camera that does not open
    monkeypatch.setattr(cv2, "VideoCapture", StubCamera)
    code, _, err = video(capsys, checkpoint, "3", "--out", tmp_path / "c.csv")
    assert code == 2 and err[0].startswith("error: camera 3 does not open")
    with pytest.raises(DataError, match="no such video file"):
        images.open_video(tmp_path / "missing.mp4", 5)

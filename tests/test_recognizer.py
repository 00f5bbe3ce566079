"""recognizer.py, the Python API: a path, a PIL image or an array give one answer; either input
alone is enough; a batch gives what single calls give; ensembles average their members'
calibrated probabilities and refuse members that read inputs differently; the default run."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import recognizer
from models import CheckpointError, load_checkpoint
from conftest import resave
from data import CLASSES
from recognizer import EmotionRecognizer
from runtime import DataError
from test_demo import PHOTO, predict_json


@pytest.fixture(scope="module")
def loaded(runs):
    return {name: EmotionRecognizer.load(runs / name / "best.pt", device="cpu") for name in ("model_a", "model_b")}


def two_faces(path):
    """The test photo beside a smaller copy of itself: two faces, the larger first."""
    photo = np.array(Image.open(PHOTO).convert("L"))
    canvas = np.full((320, 560), 128, np.uint8)
    canvas[:, :320] = photo
    canvas[40:280, 320:] = np.array(Image.fromarray(photo).resize((240, 240)))
    Image.fromarray(canvas).save(path)
    return path


def close(first, second, tolerance=1e-5):
    """Two predictions with the same faces and probabilities within `tolerance`."""
    assert [face.box for face in first.faces] == [face.box for face in second.faces]
    assert first.inputs == second.inputs and first.truncated == second.truncated
    assert first.probabilities == pytest.approx(second.probabilities, abs=tolerance)
    for mine, theirs in zip(first.faces, second.faces):
        assert mine.probabilities == pytest.approx(theirs.probabilities, abs=tolerance)


def test_a_path_a_pil_image_and_an_array_give_the_same_answer(loaded):
    model = loaded["model_b"]
    text = "what a day, i could cry"
    by_path = model.predict(image=PHOTO, text=text)
    rgb = np.array(Image.open(PHOTO).convert("RGB"))
    for image in (str(PHOTO), Image.open(PHOTO), rgb, np.array(Image.fromarray(rgb).convert("L"))):
        close(model.predict(image=image, text=text), by_path, tolerance=1e-6)
    assert list(by_path.probabilities) == CLASSES and sum(by_path.probabilities.values()) == pytest.approx(1)
    assert by_path.label == max(by_path.probabilities, key=by_path.probabilities.get)
    assert len(by_path.faces) == 1 and by_path.inputs == ["image", "text"] and by_path.truncated is False
    assert by_path.faces[0].label == by_path.label and by_path.face["box"] == by_path.faces[0].box


def test_the_answer_is_what_demo_json_prints(runs, loaded, capsys):
    out = predict_json(runs / "model_b" / "best.pt", PHOTO, "so proud of you", capsys)
    result = loaded["model_b"].predict(image=PHOTO, text="so proud of you")
    assert json.loads(json.dumps(result.to_dict())) == out


def test_either_input_alone_and_neither(loaded):
    model = loaded["model_a"]
    text_alone = model.predict(text="so happy today")
    assert text_alone.inputs == ["text"] and text_alone.faces == [] and text_alone.face is None
    face_alone = model.predict(image=PHOTO)
    assert face_alone.inputs == ["image"] and len(face_alone.faces) == 1
    # what the missing input is: the blank face of the evaluation, read whole
    gray = np.full((75, 75), 128, np.uint8)
    undetected = EmotionRecognizer(model.members, model.paths, "cpu", detect=False)
    blank = undetected.predict(image=gray, text="so happy today")
    assert text_alone.probabilities == pytest.approx(blank.probabilities, abs=1e-6)
    for pair, words in [((None, None), "needs an image, a text or both"), ((None, "   "), "empty"),
                        ((PHOTO, 3), "int"), ((np.zeros((4, 4, 4), np.uint8), None), "must be uint8"),
                        ((np.zeros((4, 4), np.float32), None), "uint8"), ((["x"], None), "not a list")]:
        with pytest.raises(DataError, match=words):
            model.predict(*pair)


def test_a_long_sentence_is_marked_truncated(loaded):
    model = loaded["model_b"]
    result = model.predict(text=" ".join(["so happy and proud today"] * 12))
    assert result.truncated is True and result.warnings[0].endswith(f"the first {model.max_len}: the rest is cut")
    assert model.predict(text="so happy").truncated is False


@pytest.mark.parametrize("name", ["model_a", "model_b"])
def test_a_batch_gives_what_single_calls_give(loaded, tmp_path, name):
    model = loaded[name]
    Image.fromarray(np.tile(np.linspace(0, 255, 200).astype(np.uint8), (100, 1))).save(tmp_path / "no_face.png")
    pairs = [(PHOTO, "what a day"), (two_faces(tmp_path / "two.png"), "so angry at everyone"),
             (None, "i can't stop smiling"), (PHOTO, None), (tmp_path / "no_face.png", "calm"),
             ({"image": Image.open(PHOTO), "text": " ".join(["so proud"] * 40)}),
             (np.array(Image.open(PHOTO)), "honestly i feel so happy today")]
    singles = [model.predict(*recognizer.pair_parts(pair)) for pair in pairs]
    # batches that mix sentence lengths, faces and missing inputs, cut at other places
    for batch_size in (3, 64):
        batched = model.predict_many(pairs, batch_size=batch_size)
        assert len(batched) == len(pairs)
        for single, many in zip(singles, batched):
            close(many, single)
    assert [len(result.faces) for result in singles] == [1, 2, 0, 1, 0, 1, 1]
    assert singles[4].warnings and "no face found" in singles[4].warnings[0]


def test_a_bad_pair_in_a_batch(loaded, tmp_path):
    model = loaded["model_a"]
    (tmp_path / "notes.jpg").write_text("not an image")
    pairs = [(PHOTO, "so happy"), (tmp_path / "missing.jpg", "hi"), (tmp_path / "notes.jpg", None), (None, "hi")]
    with pytest.raises(DataError, match="no such file"):
        model.predict_many(pairs)
    results = model.predict_many(pairs, errors="return")
    assert isinstance(results[1], DataError) and "no such file" in str(results[1])
    assert isinstance(results[2], DataError) and "not an image" in str(results[2])
    close(results[0], model.predict(PHOTO, "so happy"))
    close(results[3], model.predict(None, "hi"))


def test_any_failure_on_one_pair_is_a_data_error_naming_it(loaded, tmp_path, monkeypatch):
    # issue 54: an OpenCV error on one odd photo ended the whole batch
    model = loaded["model_a"]
    real = recognizer.face_crops

    def fail_on_odd(gray, *args, **kwargs):
        if gray.shape == (123, 123):
            raise RuntimeError("resize failed\n in function 'resize'")
        return real(gray, *args, **kwargs)

    monkeypatch.setattr(recognizer, "face_crops", fail_on_odd)
    odd = tmp_path / "odd.png"
    Image.fromarray(np.full((123, 123), 128, np.uint8)).save(odd)
    pairs = [(PHOTO, "so happy"), (odd, "hi"), (np.full((123, 123), 128, np.uint8), "hi"),
             (np.full((1, 1000), 128, np.uint8), "hi")]
    results = model.predict_many(pairs, errors="return")
    assert str(results[1]) == f"{odd} could not be predicted (RuntimeError: resize failed in function 'resize')"
    assert isinstance(results[2], DataError) and str(results[2]).startswith("the pair could not be predicted")
    assert isinstance(results[3], DataError) and "the image is too small to hold a face (1000x1" in str(results[3])
    close(results[0], model.predict(PHOTO, "so happy"))
    with pytest.raises(DataError, match="could not be predicted"):
        model.predict(odd, "hi")


def test_the_fingerprint_is_the_checkpoints_bytes_and_face_detection(runs, loaded, tmp_path):
    # what demo.py --pairs keys each answer by: a copy of the checkpoint elsewhere gives the same answers
    a, b = loaded["model_a"], loaded["model_b"]
    copy = shutil.copy(runs / "model_a" / "best.pt", tmp_path / "copy.pt")
    fingerprint = a.fingerprint()
    assert EmotionRecognizer(a.members, [copy], "cpu").fingerprint() == fingerprint
    assert EmotionRecognizer(a.members, a.paths, "cpu", detect=False).fingerprint() != fingerprint
    assert b.fingerprint() != fingerprint
    ensemble = EmotionRecognizer(a.members + b.members, a.paths + b.paths, "cpu").fingerprint()
    assert EmotionRecognizer(b.members + a.members, b.paths + a.paths, "cpu").fingerprint() == ensemble
    assert ensemble not in (fingerprint, b.fingerprint())


@pytest.mark.slow
def test_an_ensemble_averages_its_members_calibrated_probabilities(runs, tmp_path):
    # a third member, hotter: its calibrated probabilities differ from its source's
    hot = resave(runs / "model_a" / "best.pt", tmp_path / "hot" / "best.pt", temperature=3.0)
    paths = [runs / "model_a" / "best.pt", runs / "model_b" / "best.pt", hot]
    members = [EmotionRecognizer.load(path, device="cpu") for path in paths]
    ensemble = EmotionRecognizer.load(paths, device="cpu")
    for image, text in [(PHOTO, "what a day"), (None, "so angry"), (PHOTO, None)]:
        alone = [member.predict(image, text).probabilities for member in members]
        mean = {name: sum(p[name] for p in alone) / len(alone) for name in CLASSES}
        assert ensemble.predict(image, text).probabilities == pytest.approx(mean, abs=1e-6)
    assert alone[0] != pytest.approx(alone[2], abs=1e-3)


def foreign_tokenizer(source, target):
    """`source` saved again at `target` with a tokenizer in which two words swap ids."""
    tokenizer = json.loads(load_checkpoint(source)[2]["tokenizer"])
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[5:7]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    return resave(source, target, tokenizer_json=json.dumps(tokenizer))


def test_an_ensemble_refuses_members_that_read_inputs_otherwise(runs, tmp_path):
    source = runs / "model_b" / "best.pt"
    foreign = foreign_tokenizer(source, tmp_path / "foreign.pt")
    renamed = resave(source, tmp_path / "renamed.pt", classes=CLASSES[::-1])
    for other, what in [(foreign, "its tokenizer differs"), (renamed, "its class list differs")]:
        with pytest.raises(CheckpointError, match=what) as caught:
            EmotionRecognizer.load([runs / "model_a" / "best.pt", other], device="cpu")
        assert "\n" not in str(caught.value) and str(other) in str(caught.value)


def fake_run(root, name, arch, val_f1s, modality=None):
    """A run folder as train.py leaves it, as far as default_checkpoint reads it (an older
    args.json has no modality: a fused run)."""
    run = root / name
    run.mkdir()
    (run / "best.pt").touch()
    (run / "args.json").write_text(json.dumps({"model": arch, **({"modality": modality} if modality else {})}))
    (run / "log.csv").write_text("epoch,val_macro_f1\n" + "".join(f"{i},{f1}\n" for i, f1 in enumerate(val_f1s)))


def test_default_checkpoint_prefers_fused_models_and_says_why(tmp_path):
    # Issue 19: a text-only B run scoring higher than the fused one was picked.
    fake_run(tmp_path, "b_text", "b", [0.60], modality="text")
    fake_run(tmp_path, "a_image", "a", [0.70], modality="image")
    why = recognizer.default_checkpoint(tmp_path)[1]
    assert why.startswith("Model A, image-only, val macro-F1 0.700: no fused run")
    fake_run(tmp_path, "a_fused", "a", [0.50])
    assert recognizer.default_checkpoint(tmp_path)[0] == str(tmp_path / "a_fused" / "best.pt")
    fake_run(tmp_path, "b_fused", "b", [0.55], modality="both")
    path, why = recognizer.default_checkpoint(tmp_path)
    assert path == str(tmp_path / "b_fused" / "best.pt") and "fused" in why and "4 run(s)" in why


def test_no_path_loads_the_default_run(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").symlink_to(runs)
    chosen = EmotionRecognizer.load(device="cpu")
    assert chosen.paths == [recognizer.default_checkpoint()[0]]
    assert chosen.paths[0] in ("checkpoints/model_a/best.pt", "checkpoints/model_b/best.pt")
    with pytest.raises(DataError, match="no checkpoint found under elsewhere"):
        EmotionRecognizer.load(device="cpu", root="elsewhere")

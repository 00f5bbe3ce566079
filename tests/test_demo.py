"""demo.py: any image works, the JSON is a distribution, bad input is one clean line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
import recognizer
from data import BLANK_PIXEL, CLASSES
from images import detect_faces
from models import load_checkpoint
from conftest import resave
from test_images import bomb_png

ROOT = Path(__file__).resolve().parents[1]


def face(path, mode="L", size=(75, 75), seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def predict_json(checkpoint, image, text, capsys, *extra):
    assert demo.main(["--image", str(image), "--text", text, "--checkpoint", str(checkpoint), "--json",
                      *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name,mode,size", [("gray.png", "L", (75, 75)),
                                            ("color.jpg", "RGB", (200, 150)),
                                            ("small.webp", "RGB", (40, 40)),
                                            ("alpha.png", "RGBA", (300, 300))])
def test_json_is_a_distribution_for_any_image(runs, tmp_path, capsys, name, mode, size):
    checkpoint, text = runs / "model_b" / "best.pt", "i feel so happy today"
    first = predict_json(checkpoint, face(tmp_path / name, mode, size), text, capsys)
    other_image = predict_json(checkpoint, face(tmp_path / f"other-{name}", mode, size, seed=1), text, capsys)
    other_text = predict_json(checkpoint, tmp_path / name, "so angry at everyone", capsys)
    for out in (first, other_image, other_text):
        probabilities = out["probabilities"]
        assert list(probabilities) == CLASSES
        assert out["label"] == max(probabilities, key=probabilities.get)
    # The answer must depend on both inputs: another image, or another sentence, moves it.
    for other in (other_image, other_text):
        assert max(abs(first["probabilities"][c] - other["probabilities"][c]) for c in CLASSES) > 1e-4


def test_bar_list_starts_with_the_argmax(runs, tmp_path, capsys):
    image = face(tmp_path / "f.png")
    args = ["--image", str(image), "--text", "so angry right now",
            "--checkpoint", str(runs / "model_a" / "best.pt")]
    assert demo.main([*args, "--json"]) == 0
    label = json.loads(capsys.readouterr().out)["label"]
    assert demo.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == label and len(lines) == 8 and lines[1].split()[0] == label


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    image, not_image, foreign = face(tmp_path / "f.png"), tmp_path / "notes.png", tmp_path / "x.pt"
    bomb = bomb_png(tmp_path / "bomb.png")
    sliver = tmp_path / "sliver.png"  # 1000 x 1: shrunk for detection, it was 0 pixels high (issue 54)
    Image.fromarray(np.full((1, 1000), 128, np.uint8)).save(sliver)
    not_image.write_text("not an image")
    torch.save({"weights": torch.zeros(2)}, foreign)
    checkpoint = str(runs / "model_b" / "best.pt")
    cases = [["--image", str(tmp_path / "missing.png"), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(not_image), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(bomb), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(sliver), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(image), "--text", "", "--checkpoint", checkpoint],
             ["--image", str(image), "--text", "  \t ", "--checkpoint", checkpoint],
             ["--image", str(image), "--text", "\x01\x02", "--checkpoint", checkpoint],  # no tokens
             ["--image", str(image), "--text", "hi", "--checkpoint", str(tmp_path / "none.pt")],
             ["--image", str(image), "--text", "hi", "--checkpoint", str(foreign)]]
    for argv in cases:
        assert demo.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
        assert captured.out == ""


@pytest.mark.slow
def test_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "demo.py", "--image", str(tmp_path / "none.png"),
                             "--text", "hi", "--checkpoint", str(tmp_path / "none.pt")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


def test_examples_grid(runs, processed, tmp_path, capsys):
    out = tmp_path / "examples.png"
    assert demo.main(["--examples", "6", "--checkpoint", str(runs / "model_b" / "best.pt"),
                      "--data", str(processed), "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 300
    assert "6 test pairs" in capsys.readouterr().out


PHOTO = ROOT / "tests" / "fixtures" / "astronaut.jpg"


def test_photo_json_names_every_face_largest_first(runs, tmp_path, capsys):
    photo = np.array(Image.open(PHOTO).convert("L"))
    canvas = np.full((320, 560), 128, np.uint8)
    canvas[:, :320], canvas[40:280, 320:] = photo, np.array(Image.fromarray(photo).resize((240, 240)))
    Image.fromarray(canvas).save(tmp_path / "two.png")
    checkpoint = runs / "model_a" / "best.pt"
    out = predict_json(checkpoint, tmp_path / "two.png", "what a day", capsys)
    faces = out["faces"]
    assert [face["box"] for face in faces] == [list(box) for box in detect_faces(canvas)] and len(faces) == 2
    assert out["face"] == {"box": faces[0]["box"], "crop": faces[0]["crop"]}
    assert out["label"] == faces[0]["label"] and out["probabilities"] == faces[0]["probabilities"]
    assert faces[0]["probabilities"] != faces[1]["probabilities"]  # each face is its own crop
    assert demo.main(["--image", str(tmp_path / "two.png"), "--text", "what a day",
                      "--checkpoint", str(checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and lines[0] == faces[0]["label"]
    assert lines[8].split(": ")[-1].startswith(faces[1]["label"]) and str(faces[1]["box"]) in lines[8]


def test_no_face_warns_and_takes_the_centre_square(runs, tmp_path, capsys):
    gradient = np.tile(np.linspace(0, 255, 200).astype(np.uint8), (100, 1))  # 200 wide, 100 high
    Image.fromarray(gradient).save(tmp_path / "wide.png")
    Image.fromarray(gradient[:, 50:150]).save(tmp_path / "centre.png")
    checkpoint, text = runs / "model_b" / "best.pt", "i feel calm"
    assert demo.main(["--image", str(tmp_path / "wide.png"), "--text", text, "--checkpoint", str(checkpoint),
                      "--json", "--explain", str(tmp_path / "x.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: no face found") and captured.err.count("\n") == 1
    out = json.loads(captured.out)
    assert out["face"] is None and out["faces"] == []
    # The same probabilities as the centre square given alone: cropped, not stretched.
    centre = predict_json(checkpoint, tmp_path / "centre.png", text, capsys, "--no-detect")
    assert centre["probabilities"] == out["probabilities"]
    assert capsys.readouterr().err == ""  # --no-detect asked for it: no warning


def test_sixteen_bit_photo_gives_the_same_answer_as_its_8_bit_twin(runs, tmp_path, capsys):
    gray = np.array(Image.open(PHOTO).convert("L"))
    Image.fromarray(gray).save(tmp_path / "eight.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    checkpoint = runs / "model_b" / "best.pt"
    eight = predict_json(checkpoint, tmp_path / "eight.png", "so happy", capsys)
    sixteen = predict_json(checkpoint, tmp_path / "sixteen.png", "so happy", capsys)
    assert eight == sixteen and eight["face"] is not None


def test_examples_refuse_data_of_another_tokenizer(runs, processed, tmp_path, capsys):
    foreign = tmp_path / "processed"
    shutil.copytree(processed, foreign)
    tokenizer = json.loads((foreign / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[5:7]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two words swap ids
    (foreign / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "examples.png"
    assert demo.main(["--examples", "2", "--checkpoint", str(runs / "model_b" / "best.pt"),
                      "--data", str(foreign), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "tokenizer" in captured.err and captured.err.count("\n") == 1 and not out.exists()
    with pytest.raises(SystemExit) as stop:
        demo.parse_args(["--examples", "0"])
    assert stop.value.code == 2


# ---- one input is enough, single-modality checkpoints, calibration, the explain figure ----
ABLATION = {"full": 0.81, "no text": 0.35, "no image": 0.62}


@pytest.fixture(scope="module")
def variants(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    model_b = runs / "model_b" / "best.pt"
    info = load_checkpoint(model_b)[2]
    stored = {key: value for key, value in info["metrics"].items() if key != "val_ablation"}
    return {"text_b": resave(model_b, root / "text_b.pt", modality="text"),
            "image_a": resave(runs / "model_a" / "best.pt", root / "image_a.pt", modality="image"),
            "dropout_b": resave(model_b, root / "dropout_b.pt", args={**info["args"], "modality_dropout": 0.3}),
            "ablated_b": resave(model_b, root / "ablated_b.pt", metrics={**stored, "val_ablation": ABLATION}),
            "older_b": resave(model_b, root / "older_b.pt", metrics=stored),
            "hot_b": resave(model_b, root / "hot_b.pt", temperature=2.0)}


def run_demo(capsys, *argv):
    """-> (exit code, stdout, stderr lines)."""
    code = demo.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def test_one_input_is_enough_in_text_and_json(runs, tmp_path, capsys):
    checkpoint = runs / "model_b" / "best.pt"
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((75, 75), BLANK_PIXEL, np.uint8)).save(gray)
    code, out, err = run_demo(capsys, "--image", PHOTO, "--checkpoint", checkpoint, "--json")
    face_alone = json.loads(out)
    assert code == 0 and face_alone["inputs"] == ["image"] and face_alone["face"] is not None
    assert err[0] == "note: no --text: the model reads an empty sentence in its place"
    # The sentence alone: no face detection, the blank face of the evaluation's ablation, which
    # is what a gray image of that pixel gives.
    code, out, err = run_demo(capsys, "--text", "so happy today", "--checkpoint", checkpoint, "--json")
    text_alone = json.loads(out)
    assert code == 0 and text_alone["inputs"] == ["text"] and text_alone["truncated"] is False
    assert text_alone["face"] is None and text_alone["faces"] == []
    assert err[0] == "note: no --image: the model reads a blank gray face in its place"
    both = predict_json(checkpoint, gray, "so happy today", capsys, "--no-detect")
    assert both["inputs"] == ["image", "text"]
    assert text_alone["probabilities"] == pytest.approx(both["probabilities"], abs=1e-6)
    # The bar list, from either input alone.
    for argv in (["--text", "so happy today"], ["--image", PHOTO]):
        code, out, err = run_demo(capsys, *argv, "--checkpoint", runs / "model_a" / "best.pt")
        lines = out.splitlines()
        assert code == 0 and len(lines) == 8 and lines[1].split()[0] == lines[0]


def test_a_checkpoint_without_modality_dropout_warns_with_its_val_figure(runs, variants, capsys):
    # The session's runs were trained without modality dropout: one warning line.
    for checkpoint in (runs / "model_a" / "best.pt", runs / "model_b" / "best.pt"):
        code, out, err = run_demo(capsys, "--image", PHOTO, "--checkpoint", checkpoint)
        warnings = [line for line in err if line.startswith("warning:")]
        assert code == 0 and len(warnings) == 1
        assert "without --modality-dropout" in warnings[0] and "unreliable" in warnings[0]
    for name, argv, figure in [("ablated_b", ["--image", PHOTO], "val accuracy with no text: 0.35, with both: 0.81"),
                               ("ablated_b", ["--text", "hi"], "val accuracy with no image: 0.62, with both: 0.81"),
                               ("older_b", ["--text", "hi"], "no val ablation stored")]:
        code, out, err = run_demo(capsys, *argv, "--checkpoint", variants[name], "--json")
        assert code == 0 and len(err) == 2 and err[1].startswith("warning:") and err[1].endswith(f"({figure})")
    # Trained with modality dropout: the note alone; both inputs: nothing on stderr.
    code, out, err = run_demo(capsys, "--image", PHOTO, "--checkpoint", variants["dropout_b"])
    assert code == 0 and err == ["note: no --text: the model reads an empty sentence in its place"]
    code, out, err = run_demo(capsys, "--image", PHOTO, "--text", "hi", "--checkpoint", variants["ablated_b"])
    assert code == 0 and err == []


def test_a_single_modality_checkpoint_needs_only_its_input(variants, capsys):
    code, out, err = run_demo(capsys, "--text", "so happy today", "--checkpoint", variants["text_b"], "--json")
    assert code == 0 and err == [] and json.loads(out)["inputs"] == ["text"]
    code, out, err = run_demo(capsys, "--image", PHOTO, "--checkpoint", variants["image_a"], "--json")
    assert code == 0 and err == [] and json.loads(out)["inputs"] == ["image"] and json.loads(out)["face"]
    # Given both, the input it never reads is named, and not used.
    code, out, err = run_demo(capsys, "--image", PHOTO, "--text", "hi", "--checkpoint", variants["text_b"], "--json")
    assert code == 0 and err == ["note: a text-only checkpoint does not read --image"]
    assert json.loads(out)["inputs"] == ["text"] and json.loads(out)["face"] is None
    # Without the one input it reads: one line, exit 2.
    for argv, words in [(["--image", PHOTO, "--checkpoint", variants["text_b"]], "give --text"),
                        (["--text", "hi", "--checkpoint", variants["image_a"]], "give --image")]:
        code, out, err = run_demo(capsys, *argv)
        assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_probabilities_are_calibrated_with_the_checkpoint_temperature(runs, variants, capsys):
    checkpoint = runs / "model_b" / "best.pt"
    base = predict_json(checkpoint, PHOTO, "so happy today", capsys)["probabilities"]
    hot = predict_json(variants["hot_b"], PHOTO, "so happy today", capsys)["probabilities"]
    # softmax(z / T2) is softmax(z / T1) ** (T1 / T2), normalized
    power = load_checkpoint(checkpoint)[2]["temperature"] / 2.0
    total = sum(p ** power for p in base.values())
    assert hot == pytest.approx({name: p ** power / total for name, p in base.items()}, abs=1e-5)


def test_a_long_sentence_is_cut_with_a_warning(runs, tmp_path, capsys):
    checkpoint = runs / "model_b" / "best.pt"
    model, tokenizer, info = load_checkpoint(checkpoint)
    words = "so happy and proud of everything today".split() * 10
    tokens = len(tokenizer.encode(" ".join(words)).ids)
    assert tokens > model.cfg.max_len
    code, out, err = run_demo(capsys, "--image", PHOTO, "--text", " ".join(words), "--checkpoint", checkpoint,
                              "--json")
    assert code == 0 and json.loads(out)["truncated"] is True
    assert err == [f"warning: the sentence has {tokens} tokens and the model reads the first "
                   f"{model.cfg.max_len}: the rest is cut"]
    # What is cut is never read: the first max_len tokens alone give the same answer.
    kept = tokenizer.decode(tokenizer.encode(" ".join(words)).ids[:model.cfg.max_len])
    shorter = predict_json(checkpoint, PHOTO, kept, capsys)
    assert shorter["truncated"] is False
    assert shorter["probabilities"] == pytest.approx(json.loads(out)["probabilities"], abs=1e-6)


@pytest.mark.parametrize("name,argv", [("text_b", ["--image", PHOTO, "--text", "so happy today"]),
                                       ("image_a", ["--image", PHOTO]),
                                       ("model_b", ["--text", " ".join(["so happy and proud today"] * 12)]),
                                       ("model_a", ["--image", PHOTO])])
def test_explain_any_model_with_any_input(runs, variants, tmp_path, capsys, name, argv):
    checkpoint = variants.get(name) or runs / name / "best.pt"
    out = tmp_path / "explain.png"
    code, stdout, err = run_demo(capsys, *argv, "--checkpoint", checkpoint, "--explain", out)
    assert code == 0 and stdout.splitlines()[-1] == f"explanation: {out}"
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[0] > 600
    code, stdout, err = run_demo(capsys, *argv, "--checkpoint", checkpoint, "--explain", out, "--json")
    assert code == 0 and json.loads(stdout)["explanation"] == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["explain.png"]


def test_inputs_are_checked_before_the_checkpoint_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recognizer, "load_checkpoint", lambda *args: pytest.fail("the checkpoint was loaded first"))
    (tmp_path / "notes.png").write_text("not an image")
    for image, words in [(tmp_path / "missing.png", "no such file"), (tmp_path / "notes.png", "not an image"),
                         ("", "--image is empty"), ("  ", "--image is empty")]:
        code, out, err = run_demo(capsys, "--image", image, "--checkpoint", tmp_path / "any.pt")
        assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: ") and words in err[0]
        assert not err[0].startswith("error: :")


def test_usage_errors_name_the_way_out(capsys):
    for argv, words in [([], "give --image FILE, --text TEXT or both"),
                        (["--examples", "2", "--image", "x.png"], "leave out --image and --text"),
                        (["--examples", "0"], "at least 1")]:
        with pytest.raises(SystemExit) as stop:
            demo.parse_args(argv)
        assert stop.value.code == 2 and words in capsys.readouterr().err


def test_help_shows_every_flag_its_default_and_the_examples(capsys):
    parser = demo.build_parser()
    assert all(action.help for action in parser._actions)
    with pytest.raises(SystemExit) as stop:
        demo.parse_args(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and 'python demo.py --text "what a day"' in out
    assert 'python demo.py --pairs pairs.csv --out predictions.csv' in out and "python demo.py --images" in out
    # the options rewrapped as one line: where argparse breaks a line depends on the terminal
    options = " ".join(out.split("options:")[1].split())
    assert "needed unless --examples is given" in options and "(default: examples.png)" in options
    for flag in ("--pairs CSV", "--images DIR", "--batch-size", "--checkpoint PATH [PATH ...]"):
        assert flag in options
    assert "(default: predictions.csv)" in options


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_passes_only_the_inputs_given():
    def make(*args):
        return subprocess.run(["make", "--no-print-directory", "demo", "PYTHON=python", *args], cwd=ROOT,
                              capture_output=True, text=True)
    neither = make()
    assert neither.returncode != 0 and "make demo IMAGE=face.jpg TEXT=" in neither.stderr
    image = make("-n", "IMAGE=face.jpg")
    assert image.returncode == 0 and 'demo.py --image "face.jpg"' in image.stdout and "--text" not in image.stdout
    text = make("-n", "TEXT=so happy")
    assert text.returncode == 0 and 'demo.py --text "so happy"' in text.stdout and "--image" not in text.stdout

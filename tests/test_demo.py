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
from tokenizer import encode_texts
from data import CLASSES
from images import detect_faces, read_image
from checkpoints import load_checkpoint
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


def fake_run(root, name, arch, val_f1s):
    """A run folder as train.py leaves it, as far as default_checkpoint reads it."""
    run = root / name
    run.mkdir()
    (run / "best.pt").touch()
    (run / "args.json").write_text(json.dumps({"model": arch}))
    (run / "log.csv").write_text("epoch,val_macro_f1\n" + "".join(f"{i},{f1}\n" for i, f1 in enumerate(val_f1s)))


def test_default_checkpoint_prefers_model_b(runs, tmp_path):
    assert demo.default_checkpoint(runs) == str(runs / "model_b" / "best.pt")
    # Two runs of one architecture: the best epoch's val macro-F1 decides, not the last one's
    # and not the folder name; a Model A run scoring higher still loses to Model B.
    fake_run(tmp_path, "b_first", "b", [0.40, 0.62, 0.55])
    fake_run(tmp_path, "b_second", "b", [0.50, 0.58, 0.60])
    fake_run(tmp_path, "a_best", "a", [0.90])
    assert demo.default_checkpoint(tmp_path) == str(tmp_path / "b_first" / "best.pt")


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    image, not_image, foreign = face(tmp_path / "f.png"), tmp_path / "notes.png", tmp_path / "x.pt"
    bomb = bomb_png(tmp_path / "bomb.png")
    not_image.write_text("not an image")
    torch.save({"weights": torch.zeros(2)}, foreign)
    checkpoint = str(runs / "model_b" / "best.pt")
    cases = [["--image", str(tmp_path / "missing.png"), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(not_image), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(bomb), "--text", "hi", "--checkpoint", checkpoint],
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


@pytest.mark.parametrize("model", ["model_a", "model_b"])
def test_explain_writes_one_png(runs, tmp_path, capsys, model):
    out = tmp_path / "explain.png"
    result = predict_json(runs / model / "best.pt", PHOTO, "honestly i feel so happy today", capsys,
                          "--explain", str(out))
    assert result["face"] is not None
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[0] > 600
    assert [p.name for p in tmp_path.iterdir()] == ["explain.png"]  # no temporary file left


@pytest.mark.parametrize("model", ["model_a", "model_b"])
def test_token_effects_match_leaving_each_token_out(runs, model):
    model, tokenizer, info = load_checkpoint(runs / model / "best.pt")
    crop = torch.from_numpy(read_image(PHOTO, info["image_size"]))
    input_ids, lengths = encode_texts(tokenizer, ["i am feeling so happy about it"], model.cfg.max_len)
    n = int(lengths[0])
    effects, heat = demo.explain_text(model, crop, input_ids, n, 3, "cpu")
    # The same sentences, each without one token, as ordinary predictions from the images.
    without = torch.stack([torch.cat([input_ids[0, :i], input_ids[0, i + 1:n], input_ids[0, :1] * 0])
                           for i in range(n)])  # (n, n): right-padded
    full = demo.predict(model, crop[None], input_ids, lengths, "cpu")[0, 3]
    alone = demo.predict(model, crop.expand(n, -1, -1), without, torch.full((n,), n - 1), "cpu")[:, 3]
    assert effects.tolist() == pytest.approx((full - alone).tolist(), abs=1e-5)
    if model.cfg.arch == "b":  # 64 px trunk input: a 2 x 2 region grid, a distribution over it
        assert heat.shape == (2, 2) and float(heat.sum()) == pytest.approx(1.0, abs=1e-5)
    else:
        assert heat is None
        occlusion = demo.occlusion_map(model, crop, input_ids, lengths, 3, "cpu")
        assert occlusion.shape == (demo.OCCLUSION_GRID, demo.OCCLUSION_GRID) and occlusion.abs().max() > 0


def test_explain_to_a_path_that_cannot_be_written(runs, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    for target in (tmp_path / "missing" / "x.png", tmp_path / "folder.png"):
        assert demo.main(["--image", str(PHOTO), "--text", "hi", "--explain", str(target),
                          "--checkpoint", str(runs / "model_b" / "best.pt")]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: cannot write") and captured.err.count("\n") == 1
        assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]


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

"""demo.py: any image works, the JSON is a distribution, bad input is one clean line."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo

ROOT = Path(__file__).resolve().parents[1]


def face(path, mode="L", size=(75, 75)):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.mark.parametrize("name,mode,size", [("gray.png", "L", (75, 75)),
                                            ("color.jpg", "RGB", (200, 150)),
                                            ("small.webp", "RGB", (40, 40)),
                                            ("alpha.png", "RGBA", (300, 300))])
def test_json_is_a_distribution_for_any_image(runs, tmp_path, capsys, name, mode, size):
    image = face(tmp_path / name, mode, size)
    assert demo.main(["--image", str(image), "--text", "i feel so happy today",
                      "--checkpoint", str(runs / "model_b" / "best.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    probabilities = out["probabilities"]
    assert len(probabilities) == 7
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert out["label"] == max(probabilities, key=probabilities.get)


def test_bar_list_starts_with_the_argmax(runs, tmp_path, capsys):
    image = face(tmp_path / "f.png")
    args = ["--image", str(image), "--text", "so angry right now",
            "--checkpoint", str(runs / "model_a" / "best.pt")]
    assert demo.main([*args, "--json"]) == 0
    label = json.loads(capsys.readouterr().out)["label"]
    assert demo.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == label and len(lines) == 8 and lines[1].split()[0] == label


def test_default_checkpoint_prefers_model_b(runs):
    assert demo.default_checkpoint(runs) == str(runs / "model_b" / "best.pt")


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    image, not_image, foreign = face(tmp_path / "f.png"), tmp_path / "notes.png", tmp_path / "x.pt"
    not_image.write_text("not an image")
    torch.save({"weights": torch.zeros(2)}, foreign)
    checkpoint = str(runs / "model_b" / "best.pt")
    cases = [["--image", str(tmp_path / "missing.png"), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(not_image), "--text", "hi", "--checkpoint", checkpoint],
             ["--image", str(image), "--text", "", "--checkpoint", checkpoint],
             ["--image", str(image), "--text", "  \t ", "--checkpoint", checkpoint],
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

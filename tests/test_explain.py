"""explain.py, through demo.py --explain and on its own: the figure is one PNG, the token
effects are what leaving each token out changes, the sentence wraps and shows its cut."""
import pytest
import torch
from PIL import Image

import demo
import explain
from models import load_checkpoint
from images import read_image
from test_demo import PHOTO, predict_json
from data import encode_texts


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
    temperature = info["temperature"]
    effects, heat = explain.explain_text(model, crop, input_ids, n, 3, "cpu", temperature=temperature)
    # The same sentences, each without one token, as ordinary predictions from the images.
    without = torch.stack([torch.cat([input_ids[0, :i], input_ids[0, i + 1:n], input_ids[0, :1] * 0])
                           for i in range(n)])  # (n, n): right-padded
    full = explain.predict(model, crop[None], input_ids, lengths, "cpu", temperature=temperature)[0, 3]
    alone = explain.predict(model, crop.expand(n, -1, -1), without, torch.full((n,), n - 1), "cpu",
                            temperature=temperature)[:, 3]
    assert effects.tolist() == pytest.approx((full - alone).tolist(), abs=1e-5)
    if model.cfg.arch == "b":  # 64 px trunk input: a 2 x 2 region grid, a distribution over it
        assert heat.shape == (2, 2) and float(heat.sum()) == pytest.approx(1.0, abs=1e-5)
    else:
        assert heat is None
        occlusion = explain.occlusion_map(model, crop, input_ids, lengths, 3, "cpu", temperature=temperature)
        assert occlusion.shape == (explain.OCCLUSION_GRID, explain.OCCLUSION_GRID) and occlusion.abs().max() > 0


def test_explain_to_a_path_that_cannot_be_written(runs, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    for target in (tmp_path / "missing" / "x.png", tmp_path / "folder.png"):
        assert demo.main(["--image", str(PHOTO), "--text", "hi", "--explain", str(target),
                          "--checkpoint", str(runs / "model_b" / "best.pt")]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: cannot write") and captured.err.count("\n") == 1
        assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]


def test_sentence_lines_wrap_and_show_where_the_sentence_was_cut():
    text = "word " * 60 + "x" * 100 + " end"
    offsets = [(5 * i, 5 * i + 4) for i in range(10)]
    lines = explain.sentence_lines(text, offsets, torch.linspace(-0.2, 0.2, 10), cut=True)
    assert all(sum(len(piece) for piece, _ in line) <= explain.WRAP for line in lines) and len(lines) > 4
    pieces = [piece for line in lines for piece in line]
    assert "".join(piece for piece, _ in pieces) == text[:49] + " |" + text[49:]
    styles = [style for _, style in pieces]
    effects = [style for style in styles if isinstance(style, float)]
    assert effects == pytest.approx(torch.linspace(-0.2, 0.2, 10).tolist())
    cut = styles.index("cut")
    assert set(styles[cut + 1:]) == {"past"} and "past" not in styles[:cut]

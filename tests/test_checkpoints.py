"""Tests for the checkpoints (models.py): a round trip from another directory, atomic saves that refuse
what weights_only cannot load, one clear line for every unusable checkpoint, compatibility
with the data, and checkpoints from older versions.

    python -m pytest tests/test_checkpoints.py -q
"""
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece

import models
from models import CheckpointError
from data import CLASSES
from test_models import VOCAB, batch, small_model


def tokenizer_json(size=VOCAB):
    vocab = {"[PAD]": 0, "[UNK]": 1} | {f"w{i}": i for i in range(2, size)}
    return Tokenizer(WordPiece(vocab, unk_token="[UNK]")).to_str()


def save(path, model, **overrides):
    fields = dict(tokenizer_json=tokenizer_json(), classes=CLASSES, image_size=75, metrics={"val_macro_f1": 0.5},
                  args={"lr": 1e-4, "model": "b"}, train_state={"epoch": 3, "rng": torch.get_rng_state()})
    models.save_checkpoint(path, model, **(fields | overrides))


def test_checkpoint_round_trip_from_another_directory(tmp_path, monkeypatch):
    model = small_model("b").eval()
    path = tmp_path / "run" / "best.pt"
    save(path, model)
    assert os.listdir(path.parent) == ["best.pt"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["arch"] == "b" and raw["image_size"] == 75
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded, tokenizer, info = models.load_checkpoint(path)
    assert not loaded.training and loaded.cfg == model.cfg
    assert info["classes"] == CLASSES and info["metrics"] == {"val_macro_f1": 0.5}
    assert info["train_state"]["epoch"] == 3 and info["args"]["lr"] == 1e-4 and "torch" in info["versions"]
    assert tokenizer.get_vocab_size() == VOCAB and tokenizer.token_to_id("w7") == 7
    ids, lengths, faces = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, lengths, images=faces), model(ids, lengths, images=faces))
    assert loaded.feature_fingerprint() == model.feature_fingerprint()


def test_unstorable_value_fails_at_save_and_keeps_the_old_file(tmp_path):
    model = small_model("a")
    path = tmp_path / "last.pt"
    save(path, model)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"checkpoint\['args'\]\['out'\] is a PosixPath"):
        save(path, model, args={"out": Path("runs")})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


class Foreign:
    pass


def broken_variants(path, model):
    """(name, writer, expected message) for each way a checkpoint can be unusable."""
    def rewrite(change):
        def write(target):
            save(target, model)
            checkpoint = torch.load(target, weights_only=True)
            change(checkpoint)
            torch.save(checkpoint, target)
        return write
    return [
        ("missing", lambda target: None, "no such checkpoint file"),
        ("text", lambda target: target.write_text("hello"), "not a readable PyTorch checkpoint"),
        ("pickled object", lambda target: torch.save({"x": Foreign()}, target), "pickled Python objects"),
        ("foreign", lambda target: torch.save({"state_dict": {}}, target), "not a checkpoint of this project"),
        ("version", rewrite(lambda c: c.update(version=99)), "checkpoint version 99"),
        ("config", rewrite(lambda c: c["config"].update(arch="z")), "broken checkpoint.*unknown arch"),
        ("unknown field", rewrite(lambda c: c["config"].update(colour=1)), "broken checkpoint.*colour"),
        ("weights", rewrite(lambda c: c["model"].pop("head.1.weight")), "broken checkpoint.*head.1.weight"),
        ("tokenizer", rewrite(lambda c: c.update(tokenizer=tokenizer_json(40))), "tokenizer has 40 tokens"),
        ("classes", rewrite(lambda c: c.update(classes=CLASSES[:5])), "5 class names for a 7-class model"),
    ]


def test_bad_checkpoints_get_one_clear_line(tmp_path):
    model = small_model("b")
    for name, write, message in broken_variants(tmp_path, model):
        target = tmp_path / f"{name.replace(' ', '_')}.pt"
        write(target)
        with pytest.raises(CheckpointError, match=message) as caught:
            models.load_checkpoint(target)
        assert "\n" not in str(caught.value) and str(target) in str(caught.value), name


def test_check_compatible_refuses_other_classes_tokenizers_sizes_and_lengths(tmp_path):
    save(tmp_path / "best.pt", small_model("b"))
    _, _, info = models.load_checkpoint(tmp_path / "best.pt")
    same = Tokenizer.from_str(tokenizer_json())
    meta = {"classes": CLASSES, "image_size": 75, "max_len": 16}
    models.check_compatible(info, same, meta)
    five = ["Angry", "Fear", "Happy", "Sad", "Surprise"]
    with pytest.raises(CheckpointError, match="classes"):
        models.check_compatible(info, same, meta | {"classes": five})
    other_vocab = {"[PAD]": 0, "[UNK]": 1} | {f"v{i}": i for i in range(2, VOCAB)}
    other = Tokenizer(WordPiece(other_vocab, unk_token="[UNK]"))
    with pytest.raises(CheckpointError, match="tokenizer"):
        models.check_compatible(info, other, meta)
    with pytest.raises(CheckpointError, match="--image-size 75"):
        models.check_compatible(info, same, meta | {"image_size": 100})
    # Longer sequences than Model B's position table: one line, not a ValueError from inside the model.
    with pytest.raises(CheckpointError, match="--max-len 16"):
        models.check_compatible(info, same, meta | {"max_len": 64})


def test_checkpoints_from_before_modality_and_augment_still_load(tmp_path):
    model = small_model("b").eval()
    save(tmp_path / "old.pt", model)
    checkpoint = torch.load(tmp_path / "old.pt", weights_only=True)
    del checkpoint["config"]["modality"], checkpoint["config"]["augment"]
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded, _, _ = models.load_checkpoint(tmp_path / "old.pt")
    assert loaded.cfg.modality == "both" and loaded.cfg.augment is False
    text_only = small_model("b", modality="text").eval()  # and a model without a trunk round-trips
    save(tmp_path / "text.pt", text_only)
    reloaded, _, _ = models.load_checkpoint(tmp_path / "text.pt")
    ids, lengths, images = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, lengths, images=images), model(ids, lengths, images=images))
        assert torch.equal(reloaded(ids, lengths), text_only(ids, lengths))


def test_a_checkpoint_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    # A rename alone survives a crashed process, not a power cut: the file's bytes are synced
    # under its temporary name, then the folder that records the rename.
    synced = []
    fsync = os.fsync

    def recorded(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((name, (tmp_path / "run" / "best.pt").exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    save(tmp_path / "run" / "best.pt", small_model("a"))
    (written, renamed_yet), (folder, renamed) = synced
    assert written.name == "best.pt" and written.parent.name.startswith(".tmp-") and not renamed_yet
    assert folder == tmp_path / "run" and renamed


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    target = tmp_path / "a_file" / "run" / "best.pt"
    with pytest.raises(CheckpointError, match=rf"^cannot write {target}: NotADirectoryError") as caught:
        save(target, small_model("a"))
    assert "\n" not in str(caught.value)

"""Starting a branch from another run: --trunk-from (the trunk of an image-only run) and
--text-from (the text branch of a text-only run), and the checkpoints that do not fit."""
import csv

import pytest
import torch

import evaluate
import train
from models import load_checkpoint
from conftest import TINY, resave
from data import load_meta, load_tokenizer
from train import make_optimizer


def built(argv, processed):
    """The model train.py would start from, for `argv`."""
    args, _ = train.parse_args([*argv, "--data", str(processed), *TINY])
    model, _ = train.build(args, load_meta(processed), load_tokenizer(processed), torch.device("cpu"), None)
    return model


@pytest.mark.slow
def test_trunk_from_starts_the_trunk_from_another_run(runs, processed, tmp_path, capsys):
    # a donor whose trunk is not what a fresh model of the same seed would draw
    donor, _, _ = load_checkpoint(runs / "model_a" / "best.pt")
    with torch.no_grad():
        donor.image_encoder.trunk[0].weight.mul_(1.5)
    source = resave(runs / "model_a" / "best.pt", tmp_path / "donor.pt", model=donor)
    common = ["--data", str(processed), "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
              "--epochs", "1", *TINY]
    assert train.main(["--model", "b", "--trunk-from", str(source), *common]) == 0
    assert "trunk: from" in capsys.readouterr().out
    trained, _, trained_info = load_checkpoint(tmp_path / "model_b" / "last.pt")
    assert trained.feature_fingerprint() != built(["--model", "b"], processed).feature_fingerprint()
    # a frozen trunk: the whole run kept the donor's weights and BatchNorm statistics
    for (name, mine), (_, theirs) in zip(trained.image_encoder.trunk.state_dict().items(),
                                         donor.image_encoder.trunk.state_dict().items()):
        assert torch.equal(mine, theirs), name
    assert trained_info["args"]["trunk_from"] == str(source)
    # the results table says where the trunk came from
    results = tmp_path / "results.csv"
    for run in (tmp_path / "model_b", runs / "model_a"):
        assert evaluate.main(["--checkpoint", str(run / "best.pt"), "--data", str(processed), "--results",
                              str(results), "--cache-dir", str(tmp_path / "cache")]) == 0
    with open(results, newline="") as f:
        assert [row["Trunk"] for row in csv.DictReader(f)] == [str(source), "random"]


@pytest.mark.parametrize("flags, trunk_rate", [(["--trunk-from", "DONOR"], 1e-4), (["--no-pretrained"], 1e-3)])
def test_a_trunk_that_starts_trained_fine_tunes_at_the_backbone_rate(flags, trunk_rate, runs, processed):
    # --trunk-from's trunk has trained already, as ImageNet's has: a tenth of the head's rate.
    # Only a random trunk (--no-pretrained alone) trains at the head's.
    flags = [str(runs / "model_a" / "best.pt") if flag == "DONOR" else flag for flag in flags]
    model = built(["--model", "a", "--finetune-backbone", "--lr", "1e-3", *flags], processed)
    rates = {group["name"]: group["lr"] for group in make_optimizer(model, lr=1e-3).param_groups}
    assert rates["head"] == 1e-3 and rates["trunk"] == pytest.approx(trunk_rate)
    assert model.cfg.trunk_from == ("" if "--no-pretrained" in flags else flags[1])


@pytest.mark.parametrize("problem", ["text-only", "input size"])
def test_trunk_from_a_checkpoint_that_does_not_fit_is_one_line(problem, runs, processed, tmp_path, capsys):
    source = runs / "model_a" / "best.pt"
    if problem == "text-only":
        text_run = tmp_path / "text"
        assert train.main(["--model", "a", "--modality", "text", "--data", str(processed), "--out", str(tmp_path),
                           "--run-name", "text", "--epochs", "1", *TINY]) == 0
        source = text_run / "best.pt"
    size = "96" if problem == "input size" else "64"
    capsys.readouterr()
    assert train.main(["--model", "a", "--trunk-from", str(source), "--data", str(processed), "--out",
                       str(tmp_path / "runs"), "--epochs", "1", *TINY, "--input-size", size]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --trunk-from")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arch", ["a", "b"])
@pytest.mark.slow
def test_text_from_starts_the_text_branch_from_another_run(arch, runs, processed, cache, tmp_path, capsys):
    source = runs / f"model_{arch}" / "best.pt"
    donor, _, _ = load_checkpoint(source)
    model = built(["--model", arch, "--text-from", str(source)], processed)
    for (name, mine), (_, theirs) in zip(model.text_encoder.state_dict().items(),
                                         donor.text_encoder.state_dict().items()):
        assert torch.equal(mine, theirs), name
    # the text branch only: the head starts fresh
    assert not torch.equal(model.head[-1].weight, donor.head[-1].weight)
    assert train.main(["--model", arch, "--text-from", str(source), "--data", str(processed),
                       "--out", str(tmp_path), "--cache-dir", str(cache), "--epochs", "1", *TINY]) == 0
    assert f"text branch: from {source}" in capsys.readouterr().out
    _, _, trained_info = load_checkpoint(tmp_path / f"model_{arch}" / "last.pt")
    assert trained_info["args"]["text_from"] == str(source)


@pytest.mark.parametrize("problem", ["image-only", "other model", "other sizes"])
def test_text_from_a_checkpoint_that_does_not_fit_is_one_line(problem, runs, processed, tmp_path, capsys):
    source = runs / "model_b" / "best.pt"
    argv = ["--model", "b"]
    sizes = []
    if problem == "image-only":
        source = resave(source, tmp_path / "image.pt", modality="image")
    elif problem == "other model":
        argv = ["--model", "a"]
    else:
        sizes = ["--layers", "2"]  # after TINY's --layers 1
    run = tmp_path / "runs"
    assert train.main([*argv, "--text-from", str(source), "--data", str(processed), "--out", str(run),
                       "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", *TINY, *sizes]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--text-from" in err and err.startswith("error:"), err
    assert not run.exists()


@pytest.mark.parametrize("flags", [["--trunk-from", "x.pt", "--modality", "text"],
                                   ["--text-from", "x.pt", "--modality", "image"]])
def test_a_branch_for_a_model_without_it_is_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--model", "a", *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flags[0]} with --modality {flags[-1]}" in err

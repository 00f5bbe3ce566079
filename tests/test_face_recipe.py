"""The face branch's training options: logit adjustment (--logit-adjust) and MixUp / CutMix
of the faces (--mix)."""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import train
import training
from conftest import TINY
from data import Batches, load_split, load_tokenizer
from metrics import evaluate
from models import ModelConfig, build_model


def test_class_offsets_are_tau_times_the_log_prior():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    offsets = training.class_offsets(labels, 4, tau=0.5)
    # a class the split lacks counts once: a finite offset, the rarest
    assert offsets.tolist() == pytest.approx([0.5 * math.log(p) for p in (6 / 11, 3 / 11, 1 / 11, 1 / 11)])


def test_the_loss_reads_the_adjusted_logits_and_the_model_its_own(processed):
    """With lr 0 nothing moves, so an epoch's summed loss is the loss of the model's own logits
    plus the offsets over the split (a GRU without dropout reads alike in both modes)."""
    split = {k: v[:200] for k, v in load_split(processed, "train").items()}
    torch.manual_seed(0)
    vocab = load_tokenizer(processed).get_vocab_size()
    model = build_model(ModelConfig(arch="a", vocab_size=vocab, max_len=32, modality="text", dropout=0.0))
    offsets = training.class_offsets(split["labels"], 7, tau=1.0)
    no_amp = nullcontext()

    def epoch_loss(logit_offsets):
        run = training.Run(model, model, training.make_optimizer(model, 1e-3), torch.amp.GradScaler("cpu", enabled=False),
                           no_amp, Batches(split, 64, "cpu", shuffle=True), None, logit_offsets=logit_offsets)
        return training.train_epoch(run, lr_at=lambda step: 0.0, show_progress=False)[2].item()

    logits = evaluate(model, Batches(split, 64, "cpu"), no_amp)["log_probs"]  # log-softmax: the same CE
    adjusted = F.cross_entropy(logits + offsets, split["labels"], reduction="sum").item()
    plain = F.cross_entropy(logits, split["labels"], reduction="sum").item()
    assert epoch_loss(offsets) == pytest.approx(adjusted, rel=1e-5)
    assert epoch_loss(None) == pytest.approx(plain, rel=1e-5)
    assert abs(adjusted - plain) > 1.0


def test_cutmix_pastes_a_box_and_mixes_the_labels_by_its_area():
    torch.manual_seed(0)
    faces = torch.randint(0, 256, (7, 48, 48), dtype=torch.uint8)
    labels = torch.arange(7)  # no two alike: each target row names both its faces
    mixed, targets = training.mix_faces(training.make_mix("cutmix", 7), faces, labels)
    assert mixed.dtype == torch.uint8 and mixed.shape == faces.shape
    # one box for the batch (torchvision's CutMix): inside it the previous face, outside the face itself
    pasted = (mixed != faces).any(0)
    assert pasted.any() and torch.equal(mixed[:, pasted], faces.roll(1, 0)[:, pasted])
    assert torch.equal(mixed[:, ~pasted], faces[:, ~pasted])
    # the label weights: the face's own share of the area, and the rest for the pasted one
    own = 1 - pasted.float().mean()
    assert targets.sum(1).tolist() == pytest.approx([1.0] * 7)
    assert targets[torch.arange(7), labels].tolist() == pytest.approx([own.item()] * 7, abs=0.02)


def test_mixup_blends_two_faces_in_bytes():
    torch.manual_seed(0)
    faces = torch.randint(0, 256, (7, 48, 48), dtype=torch.uint8)
    labels = torch.arange(7)  # no two alike: each target row names both its faces
    mixed, targets = training.mix_faces(training.make_mix("mixup", 7), faces, labels)
    lam = targets[0, labels[0]]
    blend = lam * faces.float() + (1 - lam) * faces.roll(1, 0).float()
    assert mixed.dtype == torch.uint8 and (mixed.float() - blend).abs().max() <= 0.5 + 1e-4
    assert targets[torch.arange(7), labels].tolist() == pytest.approx([lam.item()] * 7)


def test_a_face_run_trains_with_mix_and_logit_adjustment(processed, tmp_path):
    out = tmp_path / "runs"
    assert train.main(["--model", "a", "--modality", "image", "--finetune-backbone", "--mix", "cutmix",
                       "--logit-adjust", "1", "--data", str(processed), "--out", str(out), "--epochs", "1",
                       *TINY]) == 0
    assert (out / "model_a" / "best.pt").exists()


@pytest.mark.parametrize("flags", [["--mix", "cutmix"], ["--mix", "mixup", "--modality", "image"]])
def test_mix_without_a_training_trunk_on_faces_alone_is_one_line(flags, processed, tmp_path, capfd):
    with pytest.raises(SystemExit):
        train.main(["--model", "a", "--data", str(processed), "--out", str(tmp_path / "runs"), *flags])
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "--mix" in err and not (tmp_path / "runs").exists()

"""train.py: the loop learns, resumes exactly, caches correctly and stops cleanly."""
import csv
import json
import shutil
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import runtime
import train
from conftest import EPOCHS, TINY
from models import ModelConfig, build_model, load_checkpoint
from data import BLANK_PIXEL, Batches, load_meta, load_split, load_tokenizer
from runtime import autocast, progress

TIMING = ("samples_per_s", "seconds")


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def small_model(arch, processed, input_size=64):
    torch.manual_seed(0)
    vocab = load_tokenizer(processed).get_vocab_size()
    return build_model(ModelConfig(arch=arch, vocab_size=vocab, max_len=32, input_size=input_size,
                                   pretrained=False, n_layers=1))


@pytest.mark.parametrize("arch", ["a", "b"])
def test_one_batch_overfits(arch, processed):
    model = small_model(arch, processed)
    split = {k: v[:32] for k, v in load_split(processed, "train").items()}
    batch = next(iter(Batches(split, 32, "cpu")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(150):
        loss = F.cross_entropy(model(batch["input_ids"], batch["lengths"], images=batch["images"]),
                               batch["labels"])
        if loss.item() < 0.05:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"loss {loss.item():.3f} after {step + 1} steps"


@pytest.mark.parametrize("model", ["a", "b"])
def test_tiny_run_learns(model, runs):
    # Chance is 1/7 = 0.14. About 84 % of the sentences of the five classes with texts name
    # their emotion (label noise and ambiguous words take the rest) and Disgust/Neutral need
    # the face, so the ceiling is near 0.8. 0.40 after 8-10 epochs of 420 pairs (112-140
    # steps: these models learn to read from scratch) is nearly 3x chance and fails if the
    # loop, the loss, the labels or the pairing are broken.
    best = max(float(row["val_accuracy"]) for row in read_log(runs / f"model_{model}" / "log.csv"))
    assert best > 0.40


@pytest.mark.slow
def test_resume_matches_straight_run(processed, cache, tmp_path):
    # Model A: its head dropout and modality dropout (0.2 by default) draw from the RNG in
    # every step, so a resume that restored the RNG wrongly would draw other masks
    common = ["--model", "a", "--data", str(processed), "--cache-dir", str(cache),
              "--dropout", "0.3", *TINY]
    assert train.main([*common, "--out", str(tmp_path / "straight"), "--epochs", "2"]) == 0
    assert train.main([*common, "--out", str(tmp_path / "resumed"), "--epochs", "1"]) == 0
    assert train.main(["--model", "a", "--out", str(tmp_path / "resumed"), "--epochs", "2",
                       "--resume"]) == 0
    straight, _, _ = load_checkpoint(tmp_path / "straight/model_a/last.pt")
    resumed, _, _ = load_checkpoint(tmp_path / "resumed/model_a/last.pt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    logs = [[{k: v for k, v in row.items() if k not in TIMING} for row in read_log(path)]
            for path in (tmp_path / "straight/model_a/log.csv", tmp_path / "resumed/model_a/log.csv")]
    assert len(logs[0]) == 2 and logs[0] == logs[1]


def test_checkpoints_are_self_contained(runs):
    for name in ("last.pt", "best.pt"):
        blob = torch.load(runs / "model_b" / name, map_location="cpu", weights_only=True)
        assert blob["classes"] and blob["tokenizer"] and blob["config"]["arch"] == "b"
    assert (runs / "model_b" / "curves.png").stat().st_size > 0
    assert len(read_log(runs / "model_b" / "log.csv")) == EPOCHS["b"]


def test_existing_run_is_not_overwritten(runs, processed, capsys):
    before = (runs / "model_a" / "last.pt").stat().st_mtime_ns
    assert train.main(["--model", "a", "--data", str(processed), "--out", str(runs), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (runs / "model_a" / "last.pt").stat().st_mtime_ns == before


def test_interrupt_leaves_a_resumable_run(processed, cache, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted_evaluate(*args):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during epoch 2
            raise KeyboardInterrupt
        return evaluate(*args)

    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", interrupted_evaluate)
    assert train.main(["--model", "a", "--data", str(processed), "--out", str(tmp_path),
                       "--cache-dir", str(cache), "--epochs", "3", *TINY]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "epoch 1" in err
    _, _, info = load_checkpoint(tmp_path / "model_a" / "last.pt")
    assert info["train_state"]["epoch"] == 1


def test_resume_refuses_flags_that_change_the_run(runs, capsys):
    assert train.main(["--model", "a", "--out", str(runs), "--resume", "--lr", "0.5",
                       "--batch-size", "8", "--epochs", "5", "--amp", "off", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:")
    assert "--lr 0.5" in err and "--batch-size 8" in err  # --seed 0 is the run's own: not named
    assert "--epochs" not in err and "--amp" not in err and "--seed" not in err


@pytest.mark.parametrize("missing", ["args.json", "log.csv"])
def test_resume_without_its_files_is_one_line(missing, runs, tmp_path, capsys):
    shutil.copytree(runs / "model_a", tmp_path / "model_a")
    (tmp_path / "model_a" / missing).unlink()
    assert train.main(["--model", "a", "--out", str(tmp_path), "--resume", "--epochs", "20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err
    assert not (tmp_path / "model_a" / missing).exists()


def test_resume_skips_an_empty_scaler_state(runs, processed):
    # A CPU (or bf16) run saves a disabled GradScaler's empty state; an fp16 run resumes it.
    model, _, info = load_checkpoint(runs / "model_a" / "last.pt")
    state = info["train_state"]
    assert state["scaler"] == {}
    args, _ = train.parse_args(["--model", "a"])
    optimizer = train.make_optimizer(model, args.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    batches = Batches(load_split(processed, "val"), 32, "cpu")
    run = train.Run(model, model, optimizer, scaler, nullcontext(), batches, None)
    train.restore(state, run, torch.device("cpu"))
    counters = run.counters
    assert counters.epoch == EPOCHS["a"] and scaler.get_scale() == 2.0 ** 10


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # only the dtype choice is asked
def test_amp_auto_takes_bf16_only_where_it_is_native(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast(cuda, "auto")[1] == torch.float16  # a T4 or V100: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast(cuda, "auto")[1] == torch.bfloat16  # compute capability 8.0 and later
    for native, dtype in ((False, None), (True, torch.bfloat16)):  # AVX512-BF16 or AMX, or neither
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        assert autocast(torch.device("cpu"), "auto")[1] == dtype


def test_progress_lines_when_output_is_not_a_terminal(capsys):
    assert list(progress(range(5), "epoch 1", every=0)) == list(range(5))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch 1: 1/5 batches |") and "ETA" in lines[0]


@pytest.mark.slow
def test_single_modality_runs_train_one_branch(processed, tmp_path, capsys):
    common = ["--data", str(processed), "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
              "--epochs", "1", *TINY]
    assert train.main(["--model", "a", "--modality", "text", "--run-name", "text", *common]) == 0
    assert not (tmp_path / "cache").exists()  # no image branch: nothing to cache
    assert "| sentences only\n" in capsys.readouterr().out
    assert train.main(["--model", "b", "--modality", "image", "--run-name", "image", *common]) == 0
    assert (tmp_path / "cache").exists()  # the frozen trunk's features, as for a fused model
    assert "| cached features\n" in capsys.readouterr().out
    text, _, _ = load_checkpoint(tmp_path / "text" / "best.pt")
    image, _, _ = load_checkpoint(tmp_path / "image" / "best.pt")
    assert text.cfg.modality == "text" and text.image_encoder is None
    assert image.cfg.modality == "image" and not image.uses_text


def test_text_dropout_sets_model_bs_encoder_and_cross_attention_only(processed, tmp_path):
    meta, tokenizer = load_meta(processed), load_tokenizer(processed)
    args, _ = train.parse_args(["--model", "b", "--text-dropout", "0.3", *TINY])
    model, _ = train.build(args, meta, tokenizer, torch.device("cpu"), tmp_path)
    inner = [m.p for part in (model.text_encoder.encoder, model.cross_attention) for m in part.modules()
             if isinstance(m, torch.nn.Dropout)] + [model.cross_attention.attention.dropout]
    assert len(inner) > 3 and set(inner) == {0.3}
    assert model.head[0].p == 0.2 and model.text_encoder.dropout.p == 0.0  # head, --embed-dropout


def test_fine_tuning_recipe_groups_rates_and_smoothing(processed, tmp_path):
    meta, tokenizer = load_meta(processed), load_tokenizer(processed)
    args, _ = train.parse_args(["--model", "a", "--finetune-backbone", "--lr", "1e-3", *TINY])
    model, _ = train.build(args, meta, tokenizer, torch.device("cpu"), tmp_path)
    assert model.cfg.augment and not train.uses_cache(args, model)
    optimizer = train.make_optimizer(model, args.lr)
    # a random trunk (--no-pretrained) learns at the head's rate; a pretrained one at a tenth (test_models)
    assert {group["name"]: group["lr"] for group in optimizer.param_groups} == {
        "head": 1e-3, "head no decay": 1e-3, "trunk": 1e-3, "trunk no decay": 1e-3}

    torch.manual_seed(0)
    model = small_model("a", processed)
    model.head[2].p = 0.0  # dropout off: the loss of the step is the loss of these logits
    batches = Batches({k: v[:32] for k, v in load_split(processed, "train").items()}, 32, "cpu")
    batch = next(iter(batches))
    with torch.no_grad():
        logits = model.train()(batch["input_ids"], batch["lengths"], images=batch["images"])
    expected = F.cross_entropy(logits, batch["labels"], reduction="sum", label_smoothing=0.1)
    optimizer = train.make_optimizer(model, lr=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = train.Run(model, model, optimizer, scaler, nullcontext(), batches, None)
    _, _, loss_sum = train.train_epoch(run, label_smoothing=0.1, show_progress=False)
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = F.cross_entropy(logits, batch["labels"], reduction="sum")
    assert abs(expected.item() - plain.item()) > 0.1  # the smoothing changes this batch's loss


def test_resume_of_an_older_optimizer_layout_is_one_line(runs, tmp_path, capsys):
    # train.py before parameter groups kept the head's parameters in one group
    shutil.copytree(runs / "model_a", tmp_path / "model_a")
    path = tmp_path / "model_a" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    groups = checkpoint["train_state"]["optimizer"]["param_groups"]
    merged = {**groups[0], "params": [i for group in groups for i in group["params"]]}
    checkpoint["train_state"]["optimizer"]["param_groups"] = [merged]
    torch.save(checkpoint, path)
    assert train.main(["--model", "a", "--out", str(tmp_path), "--resume", "--epochs", "20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parameter groups" in err and "--run" in err
    assert read_log(tmp_path / "model_a" / "log.csv") == read_log(runs / "model_a" / "log.csv")


@pytest.mark.slow
def test_a_resume_that_changes_the_length_of_a_cosine_run_is_refused(processed, cache, tmp_path, capsys):
    common = ["--model", "a", "--data", str(processed), "--out", str(tmp_path), "--cache-dir", str(cache),
              "--cosine", *TINY]
    assert train.main([*common, "--epochs", "1"]) == 0
    before = (tmp_path / "model_a" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train.main([*common, "--epochs", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "--cosine" in err
    assert (tmp_path / "model_a" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--epochs", "0"], ["--device", "gpu"],
                                   ["--modality-dropout", "1.5"], ["--embed-dropout", "1"],
                                   ["--text-dropout", "1"]])
def test_bad_values_are_one_line_and_write_nothing(flags, processed, tmp_path, capfd):
    with pytest.raises(SystemExit) if flags[0] != "--device" else nullcontext():
        code = train.main(["--model", "a", "--data", str(processed), "--out", str(tmp_path / "runs"), *flags])
        assert code == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and flags[0] in err
    assert not (tmp_path / "runs").exists()


def test_modality_dropout_takes_one_input_never_both(processed):
    split = {k: v[:2000] for k, v in load_split(processed, "train").items()}
    batch = next(iter(Batches(split, 2000, "cpu")))
    blank = {"pooled": torch.full((1, 8), 7.0)}
    torch.manual_seed(0)
    dropped = train.drop_inputs(batch, 0.3, blank)
    no_text = dropped["lengths"] == 0
    # the faces stay: the model blanks the lost ones after the trunk (ImageEncoder.blank_rows)
    no_image = dropped["missing_image"]
    assert not (no_text & no_image).any()
    # p for the text; (1 - p) p for the face
    assert abs(no_text.float().mean() - 0.3) < 0.05 and abs(no_image.float().mean() - 0.21) < 0.05
    assert (dropped["input_ids"][no_text] == 0).all()
    assert torch.equal(dropped["images"], batch["images"])
    cached = {**{k: v for k, v in batch.items() if k != "images"},
              "image_features": {"pooled": torch.zeros(len(batch["labels"]), 8, dtype=torch.float16)}}
    torch.manual_seed(0)
    features = train.drop_inputs(cached, 0.3, blank)["image_features"]["pooled"]
    assert torch.equal(features[:, 0] == 7, no_image)


def test_best_checkpoint_is_calibrated_with_its_val_ablation(runs):
    _, _, info = load_checkpoint(runs / "model_b" / "best.pt")
    assert info["temperature"] > 0 and info["temperature"] != 1.0
    ablation = info["metrics"]["val_ablation"]
    assert set(ablation) == {"full", "no text", "shuffled text", "no image", "shuffled image"}
    # the tiny runs read the texts: taking them away costs most of the accuracy
    assert ablation["no text"] < ablation["full"] - 0.15


def test_fine_tuning_never_normalizes_a_blank_face(processed):
    """The trunk's BatchNorm, training, sees the real faces alone: its running statistics after a
    step are the same whether modality dropout took no face or a quarter of them, and a lost
    face reads as the blank face does in eval mode, as at test time."""
    torch.manual_seed(0)
    vocab = load_tokenizer(processed).get_vocab_size()
    cfg = ModelConfig(arch="a", vocab_size=vocab, max_len=32, input_size=64, pretrained=False, finetune=True)
    start = build_model(cfg)
    batch = next(iter(Batches(load_split(processed, "train"), 32, "cpu")))
    statistics = []
    lost = []
    for p in (0.0, 0.5):
        model = build_model(cfg)
        model.load_state_dict(start.state_dict())
        torch.manual_seed(1)
        dropped = train.drop_inputs(batch, p) if p else batch
        model.train()
        model(dropped["input_ids"], dropped["lengths"], images=dropped["images"],
              missing_image=dropped.get("missing_image"))
        statistics.append({name: value.clone() for name, value in model.image_encoder.trunk.state_dict().items()
                           if "running" in name})
        lost.append(int(dropped["missing_image"].sum()) if p else 0)
    assert lost[0] == 0 and lost[1] >= 4
    for name, value in statistics[0].items():
        assert torch.equal(value, statistics[1][name]), name
    # the lost rows' features are the blank face's in eval mode, the others their own
    model.eval()
    features = model.image_features(batch["images"])
    size = batch["images"].shape[-1]
    blank = model.image_features(torch.full((1, size, size), BLANK_PIXEL, dtype=torch.uint8))
    missing = dropped["missing_image"]
    replaced = model.image_encoder.blank_rows(features, missing, size)["pooled"]
    torch.testing.assert_close(replaced[missing], blank["pooled"].expand(int(missing.sum()), -1))
    assert torch.equal(replaced[~missing], features["pooled"][~missing])


@pytest.mark.slow
def test_a_resume_that_builds_the_cache_again_counts_each_second_once(processed, tmp_path):
    common = ["--model", "a", "--data", str(processed), "--out", str(tmp_path), "--cache-dir",
              str(tmp_path / "cache"), *TINY]
    assert train.main([*common, "--epochs", "1"]) == 0
    _, _, first = load_checkpoint(tmp_path / "model_a" / "last.pt")
    shutil.rmtree(tmp_path / "cache")
    assert train.main([*common, "--epochs", "2", "--resume"]) == 0
    assert (tmp_path / "cache").exists()
    _, _, resumed = load_checkpoint(tmp_path / "model_a" / "last.pt")
    # the first start's cache build and epoch 1, then epoch 2: the second build is not added
    second_epoch = float(read_log(tmp_path / "model_a" / "log.csv")[1]["seconds"])
    assert resumed["metrics"]["train_seconds"] == pytest.approx(
        first["metrics"]["train_seconds"] + second_epoch, abs=1e-3)


def test_args_json_names_the_prepared_data(runs, processed):
    # default_checkpoint compares val macro-F1 between runs of one data set only
    saved = json.loads((runs / "model_a" / "args.json").read_text())
    assert saved["data_key"] == load_meta(processed)["key"]


@pytest.mark.slow
def test_a_resume_reads_a_log_cut_mid_row_and_writes_each_row_whole(runs, tmp_path, monkeypatch):
    shutil.copytree(runs / "model_a", tmp_path / "model_a")
    log = tmp_path / "model_a" / "log.csv"
    # train.py once appended rows in place: a crash in epoch 10's row left "1" of "10"
    with open(log, "a") as f:
        f.write("1")
    written = []
    atomic_write = train.atomic_write

    def recorded(path):
        written.append(path.name)
        return atomic_write(path)

    monkeypatch.setattr(train, "atomic_write", recorded)
    assert train.main(["--model", "a", "--out", str(tmp_path), "--resume", "--epochs", str(EPOCHS["a"] + 1)]) == 0
    assert [int(row["epoch"]) for row in read_log(log)] == list(range(1, EPOCHS["a"] + 2))
    # log.csv is replaced whole, as the run starts and after each epoch, never appended to
    assert written.count("log.csv") == 2


@pytest.mark.parametrize("where", ["--out", "--cache-dir"])
def test_an_output_folder_under_a_file_is_one_line(where, processed, cache, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    paths = {"--out": str(tmp_path / "runs"), "--cache-dir": str(cache), where: str(blocker / "below")}
    assert train.main(["--model", "a", "--data", str(processed), *TINY, "--epochs", "1",
                       *[flag for pair in paths.items() for flag in pair]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "Not a directory" in err, err


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(processed, cache, tmp_path, monkeypatch, capsys):
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    assert train.main(["--model", "a", "--data", str(processed), "--out", str(tmp_path), "--cache-dir", str(cache),
                       *TINY, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file write failed" in err
    assert err.startswith(f"error: cannot write {tmp_path / 'model_a'}"), err

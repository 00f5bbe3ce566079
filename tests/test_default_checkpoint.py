"""recognizer.default_checkpoint: the run demo.py uses without --checkpoint. It reads each run's
args.json and log.csv alone (no checkpoint is loaded), so fake run folders stand in for runs."""
import json
import os

import demo
import recognizer

# log.csv's columns as train.py writes them
HEADER = "epoch,train_loss,train_accuracy,train_macro_f1,val_loss,val_accuracy,val_macro_f1,lr,samples_per_s,seconds\n"


def fake_run(root, name, arch, val_f1s, *, modality="both", data_key="real", trained_at=0, tail=""):
    """A run folder as train.py leaves it, as far as default_checkpoint reads it. `trained_at`:
    its log.csv's time, in seconds after the others'; `tail`: text after the last whole row."""
    run = root / name
    run.mkdir()
    (run / "best.pt").touch()
    (run / "args.json").write_text(json.dumps({"model": arch, "modality": modality, "data": f"data/{data_key}",
                                               **({"data_key": data_key} if data_key else {})}))
    rows = "".join(f"{epoch},1.0,0.5,0.5,1.0,0.5,{f1},1e-4,100,1.0\n" for epoch, f1 in enumerate(val_f1s, 1))
    log = run / "log.csv"
    log.write_text(HEADER + rows + tail)
    os.utime(log, ns=(1_000_000_000_000 + trained_at * 10**9,) * 2)
    return str(run / "best.pt")


def test_a_log_cut_mid_row_is_read_without_its_last_row(tmp_path):
    # a crash in the middle of writing a row leaves a short one, without its newline: an older
    # train.py appended rows, so its runs may hold one
    cut = fake_run(tmp_path, "cut", "a", [0.40, 0.50], tail="3,0.9,0.6")
    path, why = recognizer.default_checkpoint(tmp_path)
    assert path == cut and "val macro-F1 0.500" in why
    # even a cut number is not read as a smaller one
    (tmp_path / "cut" / "log.csv").write_text(HEADER + "1,1.0,0.5,0.5,1.0,0.5,0.40,1e-4,100,1.0\n"
                                              "2,1.0,0.5,0.5,1.0,0.5,0.9")
    assert "val macro-F1 0.400" in recognizer.default_checkpoint(tmp_path)[1]


def test_runs_on_other_data_are_not_compared_and_the_data_trained_last_wins(tmp_path):
    # the synthetic quick start scores far higher than a real run: its F1 says nothing of the real data
    quick = fake_run(tmp_path, "quickstart_b", "b", [0.95], data_key="synthetic", trained_at=0)
    real = fake_run(tmp_path, "model_a", "a", [0.45], data_key="real", trained_at=10)
    fake_run(tmp_path, "model_b", "b", [0.40], data_key="real", trained_at=5)
    path, why = recognizer.default_checkpoint(tmp_path)
    assert path == real
    assert "the best of 2 run(s) on the data set trained last" in why and "1 run(s) on other data" in why
    # train on the synthetic data again: its runs are the ones compared now
    os.utime(tmp_path / "quickstart_b" / "log.csv")
    assert recognizer.default_checkpoint(tmp_path)[0] == quick


def test_runs_of_older_versions_are_told_apart_by_their_data_folder(tmp_path):
    # an args.json written before data_key names the data by its folder only
    real = fake_run(tmp_path, "model_a", "a", [0.45], data_key=None, trained_at=10)
    fake_run(tmp_path, "quickstart_b", "b", [0.95], data_key=None)
    (tmp_path / "quickstart_b" / "args.json").write_text(json.dumps({"model": "b", "data": "data/synthetic"}))
    assert recognizer.default_checkpoint(tmp_path)[0] == real


def test_a_better_model_a_wins_and_a_fused_run_beats_a_single_input_one(tmp_path):
    fake_run(tmp_path, "b", "b", [0.50, 0.60])
    a = fake_run(tmp_path, "a", "a", [0.70, 0.65])
    fake_run(tmp_path, "text", "b", [0.90], modality="text")
    path, why = recognizer.default_checkpoint(tmp_path)
    assert path == a and why.startswith("Model A, fused, val macro-F1 0.700: the best of 3 run(s)")
    # at an equal val macro-F1, Model B
    b = fake_run(tmp_path, "b_equal", "b", [0.70])
    assert recognizer.default_checkpoint(tmp_path)[0] == b


def test_demo_help_states_the_rule():
    help_text = next(action.help for action in demo.build_parser()._actions if "--checkpoint" in action.option_strings)
    for words in ("trained last", "fused", "val macro-F1"):
        assert words in help_text, words
    assert "Model B first" not in help_text

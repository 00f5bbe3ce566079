"""gpu_check.py: one line without a GPU; every stage's plumbing on the CPU at tiny sizes; a
stopped check says how far it got."""
import json

import pytest
import torch

import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--report", str(tmp_path / "report.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: gpu-check needs a CUDA GPU")
    assert not (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_every_stage_runs_on_the_cpu_at_tiny_sizes(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--epochs", "2", "--work", str(tmp_path / "work"),
                           "--report", str(report)]) == 0
    written = json.loads(report.read_text())
    stages = {entry["stage"]: entry for entry in written["stages"]}
    assert list(stages) == ["tests", "bench_bf16", "bench_off", "prepare", "train_b", "finetune_a", "evaluate", "demo"]
    assert all(entry["passed"] for entry in stages.values()), stages
    assert stages["prepare"]["faces"] == {"train": 140, "val": 56, "test": 56}
    assert stages["train_b"]["epochs"] == 2 and stages["train_b"]["cache_s"] > 0
    assert stages["bench_off"]["dtype"] == "float32" and stages["bench_bf16"]["dtype"] == "bfloat16"
    # the demo's figures read no --amp: the bf16 pass alone measures them
    assert "demo_latency_ms" in stages["bench_bf16"] and "demo_latency_ms" not in stages["bench_off"]
    assert set(written["targets"]) == {"trunk_bf16_images_per_s", "train_b_100_epochs_min"}
    assert written["stopped_in"] is None and written["torch"] == torch.__version__
    table = capsys.readouterr().out.split("\ngpu-check ")[-1]
    assert all(f"  {name:11s} pass" in table for name in stages)


def test_a_stopped_check_says_how_far_it_got(tmp_path, monkeypatch, capsys):
    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "tests_stage", stopped)
    report = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--work", str(tmp_path / "work"),
                           "--report", str(report)]) == 1
    assert json.loads(report.read_text())["stopped_in"] == "tests"
    assert "stopped during tests: the stages above are all that ran" in capsys.readouterr().out

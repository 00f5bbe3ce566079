"""bench.py: every bad value is one line and exit 2 before any work; --help names every choice;
a tiny run goes end to end. The bench itself is a measurement, never a timed test (DESIGN.md)."""
import json

import pytest
import torch

import bench
from runtime import autocast


@pytest.mark.parametrize("flag", ["--samples", "--batch-size", "--repeats", "--photos", "--processes",
                                  "--api-input-size", "--video-seconds"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_a_count_below_one_is_one_line(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main([flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert flag in err and "Traceback" not in err


def test_an_unknown_device_is_one_line(capsys):
    assert bench.main(["--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device gpu") and err.count("\n") == 1


def test_help_names_every_amp_choice_and_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    # the options part, after the usage line that names the choices too, rewrapped as one line
    options = " ".join(out.split("options:")[1].split())
    amp_help = options.split("--amp {auto,bf16,fp16,off}")[1].split("--device")[0]
    for choice in ("auto", "bf16", "fp16", "off"):
        assert choice in amp_help
    assert "(default: auto)" in amp_help and "python bench.py --json" in out


@pytest.mark.slow
def test_a_tiny_bench_runs_end_to_end(capsys):
    # Not a timing (those are bench.py's to print): it fails when train.py or demo.py change an
    # interface the bench calls, which no other test would notice.
    assert bench.main(["--samples", "4", "--batch-size", "4", "--repeats", "1", "--device", "cpu",
                       "--photos", "3", "--processes", "1", "--video-seconds", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    auto = autocast(torch.device("cpu"), "auto")[1] or torch.float32  # bf16 on a CPU with AVX512-BF16 or AMX
    assert figures["samples"] == 4 and figures["dtype"] == str(auto).removeprefix("torch.")
    assert figures["cache_speedup"] > 0 and figures["demo_latency_ms"] > 0
    # (d): demo.py --pairs, demo.py processes and predict calls all ran, on the photos asked for
    assert figures["api_photos"] == 3 and figures["api_photo_side"] == 75
    for key in ("pairs_per_s_batch", "pairs_per_s_processes", "pairs_per_s_predict_loop",
                "batch_speedup_over_processes", "batch_speedup_over_predict_loop"):
        assert figures[key] > 0
    # (e): predict_video ran on both videos, and found faces in them
    for key in ("video_frames_per_s_1face", "video_frames_per_s_4faces", "faces_per_frame_1", "faces_per_frame_4",
                "video_decode_ms", "video_detect_ms"):
        assert figures[key] > 0


@pytest.mark.slow
def test_the_video_part_finds_every_face(tmp_path):
    # (e) on 1 s videos (5 sampled frames each): a video whose faces the detector misses would
    # time the model on no faces at all
    args = bench.parse_args([])
    checkpoint = bench.save_api_checkpoint(args, tmp_path, bench.tiny_tokenizer(500))
    figures = bench.bench_video(1, torch.device("cpu"), tmp_path, checkpoint)
    assert figures["faces_per_frame_1"] == 1 and figures["faces_per_frame_4"] == 4
    assert figures["video_frames_per_s_1face"] > 0 and figures["video_frames_per_s_4faces"] > 0
    assert figures["video_decode_ms"] > 0 and figures["video_detect_ms"] > 0
    # The model's share is the rest of a frame's time, so the parts add up; it is not asserted
    # positive: on a busy machine the second pass of decoding and detection can take longer.
    parts = figures["video_decode_ms"] + figures["video_detect_ms"] + figures["video_model_ms"]
    assert parts == pytest.approx(1000 / figures["video_frames_per_s_1face"])

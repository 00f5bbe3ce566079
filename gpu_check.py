"""Check a CUDA GPU end to end, in one command, with nothing but this repository and its
requirements (no network, no Kaggle: synthetic faces).

    make gpu-check                                 # python gpu_check.py
    python gpu_check.py --epochs 20                # a shorter training stage
    python gpu_check.py --device cpu --tiny        # the plumbing at tiny sizes (a test runs it)

Stages, each timed (wall seconds, images/s, peak memory from torch.cuda.max_memory_allocated):
  tests      the CUDA-only tests (pytest -m cuda), the cached steps under set_sync_debug_mode("error")
  bench      bench.py --json at the real shapes (input 224, batch 64), bf16, then fp32 --no-demo
  prepare    synthetic faces at the real size: 30,002 train, 7,504 val, 4,200 test, 100x100 gray
  train_b    Model B with the reference's settings from the feature cache: the cache build, then
             --epochs cached epochs (default 100)
  finetune_a one --finetune-backbone epoch of Model A
  evaluate   evaluate.py --ablate on the test pairs
  demo       demo.py on tests/fixtures/astronaut.jpg
  torchrun   with 2 or more GPUs: two processes on nccl train as one does
Then a table on stdout and results/gpu-check.json (torch and CUDA versions, the GPU, each
stage's figures, pass or fail, and the targets below). The file is written after every stage,
so a check that is stopped (Ctrl-C, `timeout`) says how far it got.

Targets: 100 cached epochs of Model B in at most 5 minutes (the reference: about 60 minutes on
an RTX 5060 Ti); the trunk forward in bf16 at least 10,000 images/s at input 224 (H100-class);
no host sync in the cached step (the tests stage).
"""
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import demo
import evaluate
import prepare_data
import train
from models import load_checkpoint
from runtime import atomic_write, script_parser

ROOT = Path(__file__).resolve().parent
# (train, val, test) faces: RAF-DB's size, as the reference trained on
REAL_FACES = "4286,1072,600"
TARGETS = {"train_b_100_epochs_min": 5.0, "trunk_bf16_images_per_s": 10000}


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (--tiny: the plumbing only)")
    p.add_argument("--epochs", type=int, default=100, help="cached epochs of Model B in the train_b stage")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: seconds on a CPU, for the check's own test")
    p.add_argument("--work", default="results/gpu-check", help="the check's data, cache and runs (made anew)")
    p.add_argument("--report", default="results/gpu-check.json", help="the JSON report")
    return p.parse_args(argv)


class Check:
    """The report as it grows: one entry a stage, written to disk after each."""

    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
                       "gpu": torch.cuda.get_device_name(device) if self.cuda else None,
                       "gpus": torch.cuda.device_count(), "tiny": args.tiny,
                       "date": time.strftime("%Y-%m-%d"), "stages": [], "stopped_in": None,
                       "targets": {}}

    def stage(self, name, work):
        """Run `work()` (-> its figures, with "passed") timed; a failure is recorded, not raised."""
        print(f"\n== {name}", flush=True)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.report["stopped_in"] = name
        self.save()
        t0 = time.perf_counter()
        try:
            figures = work()
        except Exception as err:
            figures = {"passed": False, "error": f"{type(err).__name__}: {err}"}
        entry = {"stage": name, "seconds": round(time.perf_counter() - t0, 2), **figures}
        if self.cuda:
            entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.report["stages"].append(entry)
        self.report["stopped_in"] = None
        self.save()
        return entry

    def save(self):
        path = Path(self.args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.report, indent=2) + "\n")


def run_command(argv):
    """A subprocess in the repository root -> (passed, the last lines of its output)."""
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    return done.returncode == 0, (done.stdout + done.stderr).strip().splitlines()[-5:]


def tests_stage():
    passed, tail = run_command([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"])
    return {"passed": passed, "summary": tail[-1] if tail else ""}


def bench_stage(args, amp):
    sizes = ["--samples", "16", "--batch-size", "8", "--repeats", "1", "--photos", "4", "--processes", "1"]
    sizes = sizes if args.tiny else []
    # the demo and the recognizer read no --amp: measured once, in the bf16 pass
    demo = ["--no-demo"] if amp == "off" else []
    passed, tail = run_command([sys.executable, "bench.py", "--json", "--amp", amp, "--device", args.device,
                                *sizes, *demo])
    figures = json.loads(tail[-1]) if passed else {"error": " | ".join(tail)}
    keep = ("dtype", "feature_images_per_s", "train_samples_per_s_cached", "step_ms", "step_gather_ms",
            "estimate_100_epochs_30k_min", "cache_speedup", "demo_latency_ms")
    return {"passed": passed, **{key: figures[key] for key in keep if key in figures}}


def count_faces(processed):
    meta = json.loads((processed / "meta.json").read_text())
    return {split: sum(counts.values()) for split, counts in meta["counts"].items()}


def log_rows(run_dir):
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def training_figures(run_dir, train_faces):
    """Seconds of the epochs and of the cache build, from the run's log and best.pt."""
    rows = log_rows(run_dir)
    epochs_s = sum(float(row["seconds"]) for row in rows)
    _, _, info = load_checkpoint(run_dir / "last.pt")
    return {"epochs": len(rows), "epochs_s": round(epochs_s, 1),
            "cache_s": round(info["metrics"]["train_seconds"] - epochs_s, 1),
            "samples_per_s": round(len(rows) * train_faces / epochs_s),
            "val_accuracy": float(rows[-1]["val_accuracy"])}


def torchrun_stage(args, common):
    """Two processes (nccl) and one, two epochs of Model A with no randomness in a step: the same
    weights, within what TF32 and another summation order move."""
    runs = Path(args.work) / "runs"
    exact = [*common, "--model", "a", "--dropout", "0", "--modality-dropout", "0", "--amp", "off", "--epochs", "2"]
    one, _ = run_command([sys.executable, "train.py", *exact, "--run-name", "one"])
    two, tail = run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *exact, "--run-name", "two"])
    if not (one and two):
        return {"passed": False, "error": " | ".join(tail)}
    first, _, _ = load_checkpoint(runs / "one" / "last.pt")
    second, _, _ = load_checkpoint(runs / "two" / "last.pt")
    gap = max((a.float() - b.float()).abs().max().item()
              for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    return {"passed": gap < 1e-3, "max_weight_gap": gap}


def check(record):
    """Every stage in order, into `record`."""
    args = record.args
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    processed = work / "processed"
    faces = "20,8,8" if args.tiny else REAL_FACES
    size = ["--input-size", "64", "--layers", "1"] if args.tiny else []
    common = ["--data", str(processed), "--out", str(work / "runs"), "--cache-dir", str(work / "cache"),
              "--device", args.device, "--no-pretrained", *size]
    record.stage("tests", tests_stage)
    for amp in ("bf16", "off"):
        entry = record.stage(f"bench_{amp}", lambda: bench_stage(args, amp))
        if amp == "bf16" and "feature_images_per_s" in entry:
            record.report["targets"]["trunk_bf16_images_per_s"] = entry["feature_images_per_s"]

    def prepare():
        t0 = time.perf_counter()
        code = prepare_data.main(["--source", "synthetic", "--synthetic-images", faces, "--image-size", "100",
                                  "--raw-dir", str(work / "raw"), "--out", str(processed)])
        counts = count_faces(processed)
        return {"passed": code == 0, "faces": counts,
                "images_per_s": round(sum(counts.values()) / (time.perf_counter() - t0))}

    prepared = record.stage("prepare", prepare)
    if not prepared["passed"]:
        return
    train_faces = prepared["faces"]["train"]

    def train_b():
        # the reference's settings: frozen trunk, AdamW at 1e-4, batch 64, full pairs only
        code = train.main([*common, "--model", "b", "--run-name", "b", "--epochs", str(args.epochs),
                           "--modality-dropout", "0"])
        return {"passed": code == 0, **training_figures(work / "runs" / "b", train_faces)}

    trained = record.stage("train_b", train_b)
    if "epochs_s" in trained:
        minutes = trained["epochs_s"] / trained["epochs"] * 100 / 60
        record.report["targets"]["train_b_100_epochs_min"] = round(minutes, 2)

    def finetune_a():
        code = train.main([*common, "--model", "a", "--run-name", "a_finetune", "--finetune-backbone",
                           "--epochs", "1"])
        figures = training_figures(work / "runs" / "a_finetune", train_faces)
        return {"passed": code == 0, "images_per_s": figures["samples_per_s"], "epoch_s": figures["epochs_s"]}

    record.stage("finetune_a", finetune_a)
    checkpoint = str(work / "runs" / "b" / "best.pt")
    record.stage("evaluate", lambda: {"passed": evaluate.main([
        "--checkpoint", checkpoint, "--data", str(processed), "--cache-dir", str(work / "cache"), "--ablate",
        "--results", str(work / "results.csv"), "--device", args.device]) == 0})
    record.stage("demo", lambda: {"passed": demo.main([
        "--checkpoint", checkpoint, "--image", str(ROOT / "tests" / "fixtures" / "astronaut.jpg"),
        "--text", "what a day, I could cry", "--device", args.device, "--json"]) == 0})
    if record.cuda and torch.cuda.device_count() >= 2:
        record.stage("torchrun", lambda: torchrun_stage(args, common))


def print_table(report):
    """One line a stage, then the targets."""
    gpu = report["gpu"] or report["device"]
    print(f"\ngpu-check {report['date']}: {gpu} | torch {report['torch']} | CUDA {report['cuda']}")
    for entry in report["stages"]:
        figures = {k: v for k, v in entry.items() if k not in ("stage", "passed", "seconds")}
        shown = ", ".join(f"{k} {v}" for k, v in figures.items())
        print(f"  {entry['stage']:11s} {'pass' if entry['passed'] else 'FAIL'} {entry['seconds']:8.1f} s  {shown}")
    for name, value in report["targets"].items():
        goal = TARGETS[name]
        met = value <= goal if name.endswith("_min") else value >= goal
        print(f"  target {name}: {value} ({'met' if met else 'not met'}, goal {goal})")
    if report["stopped_in"]:
        print(f"  stopped during {report['stopped_in']}: the stages above are all that ran")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
              "its plumbing runs on the CPU with --device cpu --tiny", file=sys.stderr)
        return 2
    # `timeout` and a scheduler stop with SIGTERM: report what ran, as after Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    record = Check(args, device)
    try:
        check(record)
    except KeyboardInterrupt:
        print("\ngpu-check stopped", file=sys.stderr)
    print_table(record.report)
    stages = record.report["stages"]
    return 0 if stages and not record.report["stopped_in"] and all(e["passed"] for e in stages) else 1


if __name__ == "__main__":
    sys.exit(main())

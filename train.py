"""Train Model A (ResNet-18 + GRU) or Model B (ResNet-18 + Transformer, cross-attention).

    python train.py --model b                      # the reference configuration, 100 epochs
    python train.py --model a --epochs 5 --no-pretrained
    python train.py --model a --modality image     # a single-modality baseline (image or text)
    python train.py --model b --finetune-backbone --label-smoothing 0.1 --cosine --warmup 500
    python train.py --model b --resume             # continue checkpoints/model_b/last.pt
    torchrun --nproc_per_node 2 train.py --model b # DistributedDataParallel, one process per GPU

With the trunk frozen (the default), every image goes through ResNet-18 once (and once
mirrored) into data/cache, and the epochs train on those features. The run writes
checkpoints/<run>/{last.pt, best.pt, log.csv, args.json, curves.png}.

The file reads from top to bottom: the command line; the set-up (model, batches, optimizer);
one epoch of training steps; logging, saving and resuming; calibration; and the run itself,
train(), one loop over the epochs.
"""
import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data import Batches, cached_features, load_meta, load_split, load_text_pool, load_tokenizer
from metrics import ablations, calibration_error, evaluate, fit_temperature, plot_curves, scores, temper
from models import (CheckpointError, ModelConfig, PretrainedWeightsError, build_model, check_compatible,
                    checkpoint_bytes, describe, load_checkpoint, load_text_encoder, load_trunk, save_checkpoint)
from runtime import (MASTER, RANK, WORLD_SIZE, DataError, all_ranks, atomic_write, autocast,
                     average_batchnorm_buffers, from_master, gather, one_line, pick_device, positive_int,
                     progress, read_log, script_parser, sync_batchnorm, unit_fraction)

AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
# A resume takes the rest from args.json; --data must hold compatible data (check_compatible).
RESUME_MAY_CHANGE = ("epochs", "device", "amp", "compile", "cache_dir", "data", "resume", "overwrite", "out",
                     "run_name")
LOG_COLUMNS = ["epoch", "train_loss", "train_accuracy", "train_macro_f1", "val_loss", "val_accuracy",
               "val_macro_f1", "lr", "samples_per_s", "seconds"]
# AdamW's weight decay of weight matrices: torch's default, as the reference
WEIGHT_DECAY = 0.01
# the gradient norm is clipped to this
CLIP_NORM = 1.0


# The command line
def build_parser():
    """train.py's flags; parse_args reads them."""
    p = script_parser(__doc__)
    p.add_argument("--model", choices=["a", "b"], required=True,
                   help="a: GRU text, concatenation; b: Transformer text, cross-attention over face regions")
    p.add_argument("--data", default="data/processed", help="the prepared data (prepare_data.py --out)")
    p.add_argument("--out", default="checkpoints", help="where run folders go")
    p.add_argument("--run-name", default=None,
                   help="the run's folder under --out (default model_a / model_b)")
    p.add_argument("--cache-dir", default="data/cache", help="where the frozen trunk's features are kept")
    p.add_argument("--epochs", type=positive_int, default=100, help="epochs to train in all")
    p.add_argument("--batch-size", type=positive_int, default=64, help="the global batch, over all processes")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the head (AdamW)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="of the training loss")
    p.add_argument("--modality", choices=["both", "image", "text"], default="both",
                   help="image or text: the same branch and head on one input (a baseline)")
    p.add_argument("--modality-dropout", type=unit_fraction, default=0.2, metavar="P",
                   help="a fused model's pair loses its sentence with probability P, or else its face "
                        "with probability P (never both), so that one input alone is something it knows; "
                        "0 trains on full pairs only, as the reference")
    p.add_argument("--warmup", type=int, default=0, help="warmup steps (linear)")
    p.add_argument("--cosine", action="store_true", help="cosine decay to 0 over the run")
    p.add_argument("--dropout", type=float, default=None, help="head dropout (None: A 0.5, B 0.2)")
    p.add_argument("--embed-dropout", type=unit_fraction, default=0.0, metavar="P",
                   help="dropout on each entry of the token embeddings, before Model A's GRU or Model B's "
                        "encoder (B: token + position)")
    p.add_argument("--text-dropout", type=unit_fraction, default=0.1, metavar="P",
                   help="Model B: dropout inside the encoder layers and the cross-attention block")
    p.add_argument("--layers", type=positive_int, default=3, help="Model B transformer layers")
    p.add_argument("--input-size", type=positive_int, default=224,
                   help="the trunk's input side: faces (prepare_data.py --image-size) are resized to it")
    p.add_argument("--no-pretrained", action="store_true", help="random trunk (offline use)")
    p.add_argument("--trunk-from", metavar="CHECKPOINT",
                   help="start the trunk from this checkpoint's, e.g. an image-only run fine-tuned on "
                        "these faces; frozen (and cached) unless --finetune-backbone")
    p.add_argument("--text-from", metavar="CHECKPOINT",
                   help="start the text branch from this checkpoint's, e.g. a text-only run of the same "
                        "model on these sentences; it trains on with the rest")
    p.add_argument("--finetune-backbone", action="store_true",
                   help="train the trunk too, on random views of each face (no cache)")
    p.add_argument("--no-cross-attention", action="store_true", help="Model B: concat only")
    p.add_argument("--no-cache", action="store_true", help="run the frozen trunk every step")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision: auto is bf16 where the GPU or CPU has it natively (AVX512-BF16, "
                        "AMX), fp16 on older GPUs, off on other CPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<run-name>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--seed", type=int, default=0, help="the model's init and the batch order")
    return p


def parse_args(argv=None):
    """-> (args, the names of the flags given on the command line)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.trunk_from and args.modality == "text":
        p.error("--trunk-from with --modality text: a text-only model has no trunk")
    if args.text_from and args.modality == "image":
        p.error("--text-from with --modality image: an image-only model has no text branch")
    # Parsed again over a namespace of markers: a flag still holding its marker was not given.
    unset = object()
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    args.run_name = args.run_name or f"model_{args.model}"
    return args, {name for name, value in vars(given).items() if value is not unset}


def saved_args(run_dir):
    """The run's args.json, once the files a resume needs are all there."""
    # every run writes all three by its first epoch's end
    for name in ("last.pt", "args.json", "log.csv"):
        if not (run_dir / name).exists():
            raise DataError(f"cannot resume: {run_dir / name} does not exist (restore it, or start over)")
    return json.loads((run_dir / "args.json").read_text())


def resume_args(args, given, saved):
    """The run's own settings (`saved`: its args.json), with the flags of RESUME_MAY_CHANGE given
    on this command line (each node's own --data, --cache-dir, ...); any other given flag that
    differs would silently change the run."""
    refused = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {saved[k]})" for k in sorted(given)
               if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != getattr(args, k)]
    if refused:
        raise DataError(f"--resume continues {Path(args.out) / args.run_name} as its args.json says; these flags would "
                        f"change it: {', '.join(refused)}. Drop them, or start a new run with --run-name NAME")
    # The cosine schedule spans the run's epochs: other epochs would make the learning rate jump.
    if saved.get("cosine") and "epochs" in given and args.epochs != saved["epochs"]:
        raise DataError(f"--resume with --epochs {args.epochs}: the run decays its learning rate over "
                        f"{saved['epochs']} epochs (--cosine), and a new length would make it jump; "
                        "resume with its own --epochs, or start a new run with --run-name NAME")
    kept = {name: value for name, value in saved.items() if name in vars(args) and name not in given}
    return argparse.Namespace(**{**vars(args), **kept, "out": args.out, "run_name": args.run_name})


# The set-up: the model, the batches, the optimizer
def build(args, meta, tokenizer, device, run_dir):
    """The model, and the train state when resuming from last.pt."""
    if args.resume:
        last = run_dir / "last.pt"
        model, _, info = load_checkpoint(last, device, data=from_master(lambda: checkpoint_bytes(last)))
        # the data may have been prepared again since
        check_compatible(info, tokenizer, meta)
        return model, info["train_state"]
    # --finetune-backbone's recipe includes random views of each face (augment)
    cfg = ModelConfig(arch=args.model, num_classes=len(meta["classes"]), max_len=meta["max_len"],
                      vocab_size=tokenizer.get_vocab_size(), input_size=args.input_size,
                      pretrained=not (args.no_pretrained or args.trunk_from), trunk_from=args.trunk_from or "",
                      finetune=args.finetune_backbone, embed_dropout=args.embed_dropout,
                      text_dropout=args.text_dropout, n_layers=args.layers, dropout=args.dropout,
                      cross_attention=not args.no_cross_attention, modality=args.modality,
                      augment=args.finetune_backbone)
    model = build_model(cfg)
    # Read on global rank 0 and sent to every rank, as last.pt is: nodes need no shared disk, and
    # a file rank 0 cannot read ends every rank.
    if args.trunk_from:
        load_trunk(model, args.trunk_from, meta, data=from_master(lambda: checkpoint_bytes(args.trunk_from)))
    if args.text_from:
        load_text_encoder(model, args.text_from, tokenizer, meta,
                          data=from_master(lambda: checkpoint_bytes(args.text_from)))
    return model.to(device), None


def uses_cache(args, model):
    """Train on cached features: the trunk is frozen, and there is an image branch to cache."""
    return model.cacheable and not args.no_cache


def make_batches(args, model, device):
    """The train and val batches, and the seconds spent building the feature cache."""
    train_split = load_split(args.data, "train")
    val_split = load_split(args.data, "val")
    # the random views of fine-tuning flip on their own
    flip = not model.cfg.augment
    train_features = None
    val_features = None
    seconds = 0.0
    if uses_cache(args, model):
        t0 = time.time()
        # Under torchrun the ranks build it together and each node writes its own copy (no
        # shared disk needed); a failure on any rank ends all of them in one line.
        train_features, path = cached_features(model, train_split["images"], args.cache_dir, device,
                                               flips=flip, amp=args.amp, show_progress=MASTER)
        val_features, _ = cached_features(model, val_split["images"], args.cache_dir, device,
                                          flips=False, amp=args.amp, show_progress=MASTER)
        seconds = time.time() - t0
        if MASTER:
            print(f"features: {path.parent} ({seconds:.1f} s)")
    train_batches = Batches(train_split, args.batch_size, device, features=train_features,
                            shuffle=True, flip=flip, text_pool=load_text_pool(args.data), seed=args.seed,
                            rank=RANK, world_size=WORLD_SIZE)
    # in order: each rank scores a contiguous part of val, and all_ranks() puts the parts together
    val_batches = Batches(val_split, 256, device, features=val_features, rank=RANK, world_size=WORLD_SIZE)
    return train_batches, val_batches, seconds


def default_backbone_lr_scale(cfg) -> float:
    """The trunk's learning rate over the head's when fine-tuning: a trunk that starts trained
    (ImageNet's, or --trunk-from's) wants a gentler step than a fresh head; a random trunk at a
    tenth of the rate barely moves."""
    return 0.1 if cfg.pretrained or cfg.trunk_from else 1.0


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """AdamW groups of the trainable parameters: the trunk at lr * backbone_lr_scale, the rest at lr,
    each with `base_lr` for the schedule to scale. Weight decay applies only to weight matrices and
    kernels: decay would pull biases and norm gains to zero for no regularizing gain, and would
    shrink a rare token's embedding at every step while it learns only when the token appears."""
    groups = {"head": [], "head no decay": [], "trunk": [], "trunk no decay": []}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(prefix=module_name, recurse=False):
            if parameter.requires_grad:
                part = "trunk" if name.startswith("image_encoder.") else "head"
                decay = parameter.ndim >= 2 and not isinstance(module, nn.Embedding)
                groups[part if decay else f"{part} no decay"].append(parameter)
    param_groups = []
    for key, params in groups.items():
        if params:  # a frozen trunk has no groups
            rate = lr * backbone_lr_scale if key.startswith("trunk") else lr
            param_groups.append({"name": key, "params": params, "lr": rate, "base_lr": rate,
                                 "weight_decay": 0.0 if key.endswith("no decay") else weight_decay})
    return param_groups


def make_optimizer(model, lr, device=torch.device("cpu")):
    """AdamW over parameter_groups: no weight decay on biases, norms and embeddings."""
    groups = parameter_groups(model, lr, WEIGHT_DECAY, default_backbone_lr_scale(model.cfg))
    # fused: one kernel for all parameters. On CUDA it reads the GradScaler's inf check on the
    # device (the unfused step calls .item(), a host sync at every step); on the CPU it steps
    # ResNet-18 + GRU's 13.6M parameters in 10 ms, against 65 ms for torch's default loop
    return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))


@dataclass
class Counters:
    """Where a run stands after `epoch` epochs; checkpointed, so a resume continues from it."""
    epoch: int = 0
    step: int = 0
    best_f1: float = -1.0
    # the epochs plus building the cache, for the results table
    train_seconds: float = 0.0


@dataclass
class Run:
    """What travels from epoch to epoch: the model and what trains it, the batches, the counters."""
    # owns the parameters: what checkpoints store
    model: nn.Module
    # what each step calls: the model, compiled and/or DDP-wrapped
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mixed_precision: object  # a torch.autocast context
    train_batches: Batches
    val_batches: Batches | None
    counters: Counters = field(default_factory=Counters)
    rows: list = field(default_factory=list)  # log.csv's rows so far, as written there
    # the blank face's cached features, for --modality-dropout from the cache
    blank_features: dict | None = None


def start(args, given, run_dir):
    """Everything before the first epoch: the device and process group, the model (new or
    resumed), the batches and the optimizer, and the run's args.json and log.csv.
    -> (args, Run, what every checkpoint stores besides the model and its metrics)."""
    # under torchrun, this process's own GPU
    device = pick_device(args.device)
    if WORLD_SIZE > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # The run's files are on global rank 0's node (nodes need no shared disk): read there.
    if args.resume:
        args = resume_args(args, given, from_master(lambda: saved_args(run_dir)))
    elif from_master(lambda: (run_dir / "last.pt").exists()) and not args.overwrite:
        raise DataError(f"{run_dir} already holds a run: pass --resume to continue it, "
                        "--run-name NAME for a new one, or --overwrite to replace it")
    # fp32 matmuls and convolutions on tensor cores; no-op on the CPU
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # model init: the same on every rank
    torch.manual_seed(args.seed)
    meta = load_meta(args.data)
    # which prepared data the run trains on (args.json): default_checkpoint compares runs of one data set
    args.data_key = meta.get("key")
    tokenizer = load_tokenizer(args.data)
    model, state = build(args, meta, tokenizer, device, run_dir)
    # conv kernels NHWC, as the trunk's input is (models.ImageEncoder)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    # dropout: each rank draws its own masks
    torch.manual_seed(args.seed + RANK)
    mixed_precision, amp_dtype = autocast(device, args.amp)
    if MASTER:
        feeding = ("cached features" if uses_cache(args, model) else
                   "images through the trunk" if model.uses_image else "sentences only")
        print(f"torch {torch.__version__} | device {device} x {WORLD_SIZE} | amp {AMP_NAMES[amp_dtype]} | {feeding}"
              f"\nmodel {args.model}: {describe(model)} | {model.cfg}")
        if args.text_from:
            print(f"text branch: from {args.text_from}")
        if args.trunk_from:
            print(f"trunk: from {args.trunk_from}")
        elif not model.cfg.pretrained and model.uses_image:
            print("note: random trunk (--no-pretrained): image features are not ImageNet's")
    train_batches, val_batches, cache_seconds = make_batches(args, model, device)
    optimizer = make_optimizer(model, args.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # SyncBatchNorm for a trunk that trains on several GPUs (no-op otherwise)
    model = sync_batchnorm(model, device.type)
    step_model = torch.compile(model) if args.compile else model
    # the frozen trunk has no gradients: DDP syncs the head only
    if WORLD_SIZE > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(model, step_model, optimizer, scaler, mixed_precision, train_batches, val_batches)
    # --modality-dropout from the cache swaps a lost face's features for the blank face's
    if args.modality_dropout > 0 and run.train_batches.cached and model.cfg.modality == "both":
        run.blank_features = model.image_encoder.blank_features(meta["image_size"])
    if state is None:
        run.counters.train_seconds += cache_seconds
    else:
        # the counters hold the first start's cache build already
        restore(state, run, device)
        # a resume drops the log rows of an epoch logged but never checkpointed (rank 0 keeps the log)
        if MASTER:
            run.rows = [row for row in read_log(run_dir / "log.csv") if int(row["epoch"]) <= run.counters.epoch]
    # written on global rank 0, and a failure to write them (an unwritable --out) ends every rank
    from_master(lambda: write_run_files(run_dir, args, run.rows))
    about = dict(tokenizer_json=tokenizer.to_str(), classes=meta["classes"], image_size=meta["image_size"],
                 args=vars(args))
    return args, run, about


def write_run_files(run_dir, args, rows):
    """The run's args.json and its log.csv so far, as it starts."""
    with atomic_write(run_dir / "args.json") as tmp:
        tmp.write_text(json.dumps(vars(args), indent=2))
    write_log(run_dir, rows)


# One epoch of training steps
def lr_factor(step, total_steps, args):
    """Linear warmup, then constant (the reference) or cosine to zero."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if not args.cosine:
        return 1.0
    progress = (step - args.warmup) / max(1, total_steps - args.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def drop_inputs(batch, p, blank_features=None):
    """Modality dropout: each pair loses its sentence with probability p, or else its face with
    probability p, never both. A lost sentence is the empty text and a lost face the blank one
    (data.BLANK_PIXEL): the inputs the ablation and the demo give a model for a missing one.
    From the cache the lost faces' features become `blank_features`; through a trunk that trains,
    `missing_image` marks them for the model, which blanks them after the trunk (blank_rows)."""
    labels = batch["labels"]
    draws = torch.rand(2, len(labels), device=labels.device)
    no_text = draws[0] < p
    no_image = ~no_text & (draws[1] < p)
    batch = dict(batch)
    batch["input_ids"] = batch["input_ids"].masked_fill(no_text.unsqueeze(1), 0)
    batch["lengths"] = batch["lengths"].masked_fill(no_text.to(batch["lengths"].device), 0)
    if "images" in batch:
        batch["missing_image"] = no_image
    else:
        features = {}
        for name, value in batch["image_features"].items():
            lost = no_image.view(-1, *[1] * (value.dim() - 1))
            features[name] = torch.where(lost, blank_features[name].to(value.dtype), value)
        batch["image_features"] = features
    return batch


def train_epoch(run, *, label_smoothing=0.0, modality_dropout=0.0, lr_at=lambda step: 1.0,
                desc="train", show_progress=True):
    """One pass over run.train_batches -> (predictions, labels, summed loss), all on the device:
    nothing in the loop waits for it. Advances run.counters.step."""
    optimizer = run.optimizer
    scaler = run.scaler
    run.step_model.train()
    loss_sum = torch.zeros((), device=run.train_batches.device)
    preds = []
    labels = []
    for batch in progress(run.train_batches, desc, enabled=show_progress):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_at(run.counters.step)
        if modality_dropout > 0:
            batch = drop_inputs(batch, modality_dropout, run.blank_features)
        with run.mixed_precision:
            logits = run.step_model(batch["input_ids"], batch["lengths"], images=batch.get("images"),
                                    image_features=batch.get("image_features"),
                                    missing_image=batch.get("missing_image"))
            summed = F.cross_entropy(logits.float(), batch["labels"], reduction="sum",
                                     label_smoothing=label_smoothing)
        # DDP averages gradients over ranks; scaled so, the average is the gradient of the mean
        # over the whole global batch, even when the ranks' slices differ in size
        scaler.scale(summed * (WORLD_SIZE / batch["global_size"])).backward()
        # clip the true gradients, not the fp16-scaled ones
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), CLIP_NORM)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.counters.step += 1
        loss_sum += summed.detach()
        preds.append(logits.argmax(1))
        labels.append(batch["labels"])
    return torch.cat(preds), torch.cat(labels), loss_sum


# Logging, saving and resuming
def epoch_row(epoch, train_part, val_part, lr, seconds, num_classes):
    """The log row of one epoch from (labels, preds, summed loss) of train and of val."""
    labels, preds, loss_sum = train_part
    val_labels, val_preds, val_loss_sum = val_part
    train_scores = scores(labels, preds, num_classes)
    val_scores = scores(val_labels, val_preds, num_classes)
    return {"epoch": epoch, "train_loss": loss_sum / len(labels),
            "train_accuracy": train_scores["accuracy"], "train_macro_f1": train_scores["macro_f1"],
            "val_loss": val_loss_sum / len(val_labels), "val_accuracy": val_scores["accuracy"],
            "val_macro_f1": val_scores["macro_f1"], "lr": lr,
            "samples_per_s": len(labels) / seconds, "seconds": seconds}


def log_epoch(rows, row, improved, epochs):
    """Add the epoch to `rows` (log.csv's, as save() writes them) and print its line."""
    rows.append({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    mark = " *" if improved else "  "
    print(f"epoch {row['epoch']:3d}/{epochs} | train loss {row['train_loss']:.4f} "
          f"acc {row['train_accuracy']:.4f} f1 {row['train_macro_f1']:.4f} | val loss "
          f"{row['val_loss']:.4f} acc {row['val_accuracy']:.4f} f1 {row['val_macro_f1']:.4f}{mark} | "
          f"lr {row['lr']:.2e} | {row['samples_per_s']:.0f} samples/s | {row['seconds']:.1f} s", flush=True)


def interrupted(args, run_dir, epoch):
    """What to tell the user after Ctrl-C in `epoch`."""
    if not (run_dir / "last.pt").exists():
        return f"interrupted in epoch {epoch}, before any checkpoint: nothing to resume"
    return (f"interrupted in epoch {epoch}: {run_dir / 'last.pt'} holds epoch {epoch - 1}. Resume with:\n"
            f"  python train.py --model {args.model} --out {args.out} --run-name {args.run_name} --resume")


def write_log(run_dir, rows):
    """log.csv: the header and `rows`, replacing the file whole, so that a crash never leaves a
    row cut short in it."""
    log = io.StringIO()
    writer = csv.DictWriter(log, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(Path(run_dir) / "log.csv") as tmp:
        tmp.write_text(log.getvalue())


def save(run_dir, run, improved, about, device):
    """log.csv and last.pt (and best.pt when val improved), written by global rank 0 with every
    rank's RNG; a failure to write them (an unwritable --out, a full disk) ends every rank.
    `about`: what every checkpoint stores besides the model and metrics (tokenizer, classes, ...)."""
    # each rank draws its own dropout masks
    rngs = gather({"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []})

    def write():
        # the log first: a resume drops the rows of epochs that last.pt does not hold
        write_log(run_dir, run.rows)
        counters = run.counters
        last = {k: float(v) for k, v in run.rows[-1].items() if k != "epoch"}
        metrics = {"epoch": counters.epoch, "train_accuracy": last["train_accuracy"],
                   "val_accuracy": last["val_accuracy"], "val_macro_f1": last["val_macro_f1"],
                   "best_val_accuracy": max(float(r["val_accuracy"]) for r in run.rows),
                   "best_val_macro_f1": counters.best_f1, "train_seconds": counters.train_seconds}
        if improved:
            save_checkpoint(run_dir / "best.pt", run.model, **about, metrics=metrics)
        save_checkpoint(run_dir / "last.pt", run.model, **about, metrics=metrics, train_state={
            **asdict(counters), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "rng_batches": run.train_batches.generator.get_state(), "rng": rngs})

    from_master(write)


def restore(state, run, device):
    """Exact resume: every source of randomness picks up where it was. Sets run.counters."""
    saved = len(state["optimizer"]["param_groups"])
    made = len(run.optimizer.param_groups)
    if saved != made:
        raise DataError(f"cannot resume: last.pt's optimizer has {saved} parameter groups, this train.py "
                        f"makes {made} (it was saved by an older version): start a new run with --run-name NAME")
    run.optimizer.load_state_dict(state["optimizer"])
    # empty when saved without fp16 (CPU, bf16): the new scaler starts fresh
    if state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    run.train_batches.generator.set_state(state["rng_batches"])
    # a rank the saved run did not have keeps its own seed
    if RANK < len(state["rng"]):
        rng = state["rng"][RANK]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])
    run.counters = Counters(**{f.name: state[f.name] for f in fields(Counters)})


# Calibration, once the epochs are done
def calibrate(run_dir, val_batches, device, mixed_precision):
    """best.pt gets the temperature that calibrates its val probabilities (Guo et al., 2017), and
    its val accuracy with each input taken away: what the demo quotes for a model that never saw
    a missing input. Global rank 0 alone calls it (nothing here is collective, so a node without
    the run's files has nothing to wait for): it scores the whole val split, from the run's own
    val features where it has them (a trunk frozen for the whole run gave best.pt's too)."""
    model, _, info = load_checkpoint(run_dir / "best.pt", device)
    split = val_batches.split
    features = val_batches.features

    def scored(pairs, pair_features):
        return evaluate(model, Batches(pairs, 256, device, features=pair_features), mixed_precision)

    val = scored(split, features)
    temperature = fit_temperature(val["log_probs"], val["labels"])
    ablation = {"full": val["accuracy"]}
    for name, result in ablations(model, split, features, scored).items():
        ablation[name] = result["accuracy"]
    save_checkpoint(run_dir / "best.pt", model, tokenizer_json=info["tokenizer"], classes=info["classes"],
                    image_size=info["image_size"], metrics={**info["metrics"], "val_ablation": ablation},
                    args=info["args"], temperature=temperature)
    before = calibration_error(val["log_probs"], val["labels"])
    after = calibration_error(temper(val["log_probs"], temperature), val["labels"])
    print(f"calibrated on val: temperature {temperature:.3f}, ECE {before:.4f} -> {after:.4f}")


# The run
def train(args, given):
    """Set up the run (or resume it), then train epoch by epoch: train, gather, evaluate, log
    and save; at the end, calibrate best.pt. -> exit code."""
    run_dir = Path(args.out) / args.run_name
    args, run, about = start(args, given, run_dir)
    model = run.model
    counters = run.counters
    total_steps = args.epochs * len(run.train_batches)
    device = run.train_batches.device
    # one input alone is something only a fused model can lose
    modality_dropout = args.modality_dropout if model.cfg.modality == "both" else 0.0
    epoch = counters.epoch + 1
    try:
        for epoch in range(counters.epoch + 1, args.epochs + 1):
            # train: one pass over this epoch's shuffled batches
            t0 = time.time()
            preds, labels, loss_sum = train_epoch(
                run, label_smoothing=args.label_smoothing, modality_dropout=modality_dropout,
                lr_at=lambda step: lr_factor(step, total_steps, args), desc=f"epoch {epoch}",
                show_progress=MASTER)
            # gather: every rank's predictions (each rank trained on its slice of every batch)
            train_part = all_ranks(labels.cpu().numpy(), preds.cpu().numpy(), loss_sum.item())
            seconds = time.time() - t0
            counters.train_seconds += seconds
            # evaluate: one model on every rank (BatchNorm statistics agreed), val shared out
            average_batchnorm_buffers(model)
            val = evaluate(model, run.val_batches, run.mixed_precision)
            val_part = all_ranks(val["labels"], val["preds"], val["loss"] * len(val["labels"]))
            # log: log.csv, the printed line and the counters
            row = epoch_row(epoch, train_part, val_part, run.optimizer.param_groups[0]["lr"], seconds,
                            model.cfg.num_classes)
            improved = row["val_macro_f1"] > counters.best_f1
            counters.epoch = epoch
            counters.best_f1 = max(counters.best_f1, row["val_macro_f1"])
            if MASTER:
                log_epoch(run.rows, row, improved, args.epochs)
            # save: log.csv and last.pt every epoch, best.pt when val macro-F1 improved
            save(run_dir, run, improved, about, device)
    except KeyboardInterrupt:
        if MASTER:
            print(f"\n{interrupted(args, run_dir, epoch)}", file=sys.stderr)
        return 130
    finally:
        if run.rows and MASTER:
            plot_curves(run.rows, run_dir / "curves.png")
    if MASTER:
        calibrate(run_dir, run.val_batches, device, run.mixed_precision)
        print(f"best val macro-F1 {counters.best_f1:.4f}: {run_dir / 'best.pt'}")
    return 0


def main(argv=None):
    args, given = parse_args(argv)
    try:
        return train(args, given)
    except (DataError, CheckpointError, PretrainedWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # a path that cannot be written (--out under a file, a full disk); a rank-0 write ends every rank
    except OSError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

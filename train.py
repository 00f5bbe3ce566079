"""Train Model A (ResNet-18 + GRU) or Model B (ResNet-18 + Transformer, cross-attention).

    python train.py --model b                      # the reference configuration, 100 epochs
    python train.py --model a --epochs 5 --no-pretrained
    python train.py --model a --modality image     # a single-modality baseline (image or text)
    python train.py --model b --finetune-backbone --label-smoothing 0.1 --cosine --warmup 500
    python train.py --model b --resume             # continue checkpoints/model_b/last.pt
    torchrun --nproc_per_node 2 train.py --model b # DistributedDataParallel, one process a GPU

With the trunk frozen (the default) every image goes through ResNet-18 once (and once
mirrored) into data/cache, and the epochs train on those features. Writes
checkpoints/<run>/{last.pt, best.pt, log.csv, args.json, curves.png}.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoints import (CheckpointError, check_compatible, checkpoint_bytes, load_checkpoint, load_text_encoder,
                         load_trunk)
from data import Batches, cached_features, load_meta, load_split, load_text_pool, load_tokenizer
from distributed import MASTER, RANK, WORLD_SIZE, all_ranks, average_batchnorm_buffers, from_master, sync_batchnorm
from metrics import evaluate, plot_curves, scores
from models import ModelConfig, PretrainedWeightsError, build_model, describe
from runtime import (DataError, atomic_write, autocast, one_line, pick_device, positive_int, script_parser,
                     unit_fraction)
from training import (Run, add_extras, calibrate, lr_factor, make_optimizer, read_log, restore, save, train_epoch,
                      write_log)

AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
# A resume takes the rest from args.json; --data must hold compatible data (check_compatible).
RESUME_MAY_CHANGE = ("epochs", "patience", "device", "amp", "compile", "cache_dir", "data", "resume",
                     "overwrite", "out", "run_name")


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
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay of weight matrices (torch's default, as the reference)")
    p.add_argument("--backbone-lr-scale", type=float, default=None,
                   help="with --finetune-backbone: trunk lr = lr * this (None: 0.1 for a trunk that starts trained, "
                        "ImageNet's or --trunk-from's; 1.0 for a random one: --no-pretrained alone)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="of the training loss")
    p.add_argument("--modality", choices=["both", "image", "text"], default="both",
                   help="image or text: the same branch and head on one input (a baseline)")
    p.add_argument("--modality-dropout", type=unit_fraction, default=0.2, metavar="P",
                   help="a fused model's pair loses its sentence with probability P, or else its face "
                        "with probability P (never both), so that one input alone is something it knows; "
                        "0 trains on full pairs only, as the reference")
    p.add_argument("--ema", type=unit_fraction, default=0.0, metavar="DECAY",
                   help="evaluate, calibrate and save an exponential moving average of the weights, "
                        "updated every step with this decay (e.g. 0.999); 0: the weights as trained")
    p.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                   help="logit-adjusted loss (Menon et al., 2021): tau * log(class prior) added to the "
                        "logits in training only, so that rare classes (Disgust) are called more often; "
                        "1 is the paper's, 0 off")
    p.add_argument("--mix", choices=["mixup", "cutmix"],
                   help="--modality image --finetune-backbone: torchvision's MixUp or CutMix (alpha 1) "
                        "over each batch of faces and their labels")
    p.add_argument("--warmup", type=int, default=0, help="warmup steps (linear)")
    p.add_argument("--cosine", action="store_true", help="cosine decay to 0 over the run")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after N epochs without a better val macro-F1 (0: never)")
    p.add_argument("--dropout", type=float, default=None, help="head dropout (None: A 0.5, B 0.2)")
    p.add_argument("--embed-dropout", type=unit_fraction, default=0.0, metavar="P",
                   help="dropout on each entry of the token embeddings, before Model A's GRU or Model B's "
                        "encoder (B: token + position)")
    p.add_argument("--text-dropout", type=unit_fraction, default=0.1, metavar="P",
                   help="Model B: dropout inside the encoder layers and the cross-attention block")
    p.add_argument("--layers", type=positive_int, default=3, help="Model B transformer layers")
    p.add_argument("--heads", type=positive_int, default=4, help="Model B attention heads")
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
    p.add_argument("--no-flip", action="store_true", help="frozen trunk: no random horizontal flip")
    p.add_argument("--no-redraw", action="store_true", help="keep the prepared text of each image")
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
    if args.mix and not (args.modality == "image" and args.finetune_backbone):
        p.error("--mix mixes faces and their labels: it needs --modality image (a sentence would not "
                "mix with them) and --finetune-backbone (cached features hold no pixels)")
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
                      text_dropout=args.text_dropout, n_layers=args.layers, n_heads=args.heads, dropout=args.dropout,
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
    """Train and val batches (val split across ranks) and the seconds spent on the cache."""
    train_split = load_split(args.data, "train")
    val_split = load_split(args.data, "val")
    # the random views of fine-tuning flip on their own
    flip = not (args.no_flip or model.cfg.augment)
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
    text_pool = None if args.no_redraw else load_text_pool(args.data)
    train_batches = Batches(train_split, args.batch_size, device, features=train_features,
                            shuffle=True, flip=flip, text_pool=text_pool, seed=args.seed,
                            rank=RANK, world_size=WORLD_SIZE)
    # in order, each rank a contiguous share of val; all_ranks() puts the predictions together
    val_batches = Batches(val_split, 256, device, features=val_features, rank=RANK, world_size=WORLD_SIZE)
    return train_batches, val_batches, seconds


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
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.backbone_lr_scale, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # SyncBatchNorm for a trunk that trains on several GPUs (no-op otherwise)
    model = sync_batchnorm(model, device.type)
    step_model = torch.compile(model) if args.compile else model
    # the frozen trunk has no gradients: DDP syncs the head only
    if WORLD_SIZE > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(model, step_model, optimizer, scaler, mixed_precision, train_batches, val_batches)
    add_extras(run, args, meta["image_size"], device, state)
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


def train(args, given):
    """Set up the run (or resume it), then train epoch by epoch: train, gather, evaluate, log,
    save, stop. -> exit code."""
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
                run, clip=args.clip, label_smoothing=args.label_smoothing, modality_dropout=modality_dropout,
                lr_at=lambda step: lr_factor(step, total_steps, args), desc=f"epoch {epoch}",
                show_progress=MASTER)
            # gather: every rank's predictions (each rank trained on its slice of every batch)
            train_part = all_ranks(labels.cpu().numpy(), preds.cpu().numpy(), loss_sum.item())
            seconds = time.time() - t0
            counters.train_seconds += seconds
            # evaluate: one model on every rank (BatchNorm statistics agreed), val shared out
            average_batchnorm_buffers(model)
            if run.ema is not None:
                average_batchnorm_buffers(run.ema)
            val = evaluate(run.kept, run.val_batches, run.mixed_precision)
            val_part = all_ranks(val["labels"], val["preds"], val["loss"] * len(val["labels"]))
            # log: log.csv, the printed line and the counters
            row = epoch_row(epoch, train_part, val_part, run.optimizer.param_groups[0]["lr"], seconds,
                            model.cfg.num_classes)
            improved = row["val_macro_f1"] > counters.best_f1
            counters.epoch = epoch
            counters.best_f1 = max(counters.best_f1, row["val_macro_f1"])
            counters.stale = 0 if improved else counters.stale + 1
            if MASTER:
                log_epoch(run.rows, row, improved, args.epochs)
            # save: log.csv and last.pt every epoch, best.pt when val macro-F1 improved
            save(run_dir, run, improved, about, device)
            # stop: early, after --patience epochs without a better val macro-F1
            if args.patience and counters.stale >= args.patience:
                if MASTER:
                    print(f"early stop: val macro-F1 has not improved for {counters.stale} epochs")
                break
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

"""Train Model A (ResNet-18 + GRU) or Model B (ResNet-18 + Transformer, cross-attention).

    python train.py --model b                      # the reference configuration, 100 epochs
    python train.py --model a --epochs 5 --no-pretrained
    python train.py --model b --resume             # continue checkpoints/model_b/last.pt

With the trunk frozen (the default) every image goes through ResNet-18 once (and once
mirrored) into data/cache, and the epochs train on those features. Writes
checkpoints/<run>/{last.pt, best.pt, log.csv, args.json, curves.png}.
"""
import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import Batches, DataError, atomic_write, autocast, cached_features, load_meta, load_split, \
    load_text_pool, load_tokenizer, pick_device
from evaluate import evaluate, scores
from models import CheckpointError, ModelConfig, PretrainedWeightsError, build_model, \
    check_compatible, describe, load_checkpoint, save_checkpoint

LOG_COLUMNS = ["epoch", "train_loss", "train_accuracy", "train_macro_f1", "val_loss",
               "val_accuracy", "val_macro_f1", "lr", "samples_per_s", "seconds"]
RESUME_MAY_CHANGE = ("epochs", "device", "resume", "overwrite")  # the rest comes from args.json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["a", "b"], required=True)
    p.add_argument("--data", default="data/processed")
    p.add_argument("--out", default="checkpoints")
    p.add_argument("--run", default=None, help="run name (default model_a / model_b)")
    p.add_argument("--cache-dir", default="data/cache")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)  # torch's AdamW default, as the reference
    p.add_argument("--backbone-lr-scale", type=float, default=0.1,
                   help="with --finetune-backbone: trunk lr = lr * this")
    p.add_argument("--warmup", type=int, default=0, help="warmup steps (linear)")
    p.add_argument("--cosine", action="store_true", help="cosine decay to 0 over the run")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after this many epochs without a better val macro-F1 (0: never)")
    p.add_argument("--dropout", type=float, default=None, help="head dropout (A 0.5, B 0.2)")
    p.add_argument("--layers", type=int, default=3, help="Model B transformer layers")
    p.add_argument("--heads", type=int, default=4, help="Model B attention heads")
    p.add_argument("--input-size", type=int, default=224, help="trunk input resolution")
    p.add_argument("--no-pretrained", action="store_true", help="random trunk (offline use)")
    p.add_argument("--finetune-backbone", action="store_true", help="train the trunk too (no cache)")
    p.add_argument("--no-cross-attention", action="store_true", help="Model B: concat only")
    p.add_argument("--no-cache", action="store_true", help="run the frozen trunk every step")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--no-redraw", action="store_true", help="keep the prepared text of each image")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<run>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.run = args.run or f"model_{args.model}"
    return args


def lr_factor(step, total_steps, args):
    """Linear warmup, then constant (the reference) or cosine to zero."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if not args.cosine:
        return 1.0
    progress = (step - args.warmup) / max(1, total_steps - args.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def write_text(path, text):
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_log(path, rows):
    """log.csv holding `rows`: none for a new run, the checkpointed epochs on a resume."""
    out = io.StringIO()
    writer = csv.DictWriter(out, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())


def plot_curves(rows, path):
    import matplotlib
    matplotlib.use("Agg")  # no display on a training box
    import matplotlib.pyplot as plt
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ["loss", "accuracy"]):
        for split in ("train", "val"):
            ax.plot(epochs, [float(r[f"{split}_{metric}"]) for r in rows], marker=".", label=split)
        ax.set_xlabel("epoch"), ax.set_ylabel(metric), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train_epoch(model, batches, optimizer, scaler, mixed_precision, *, step, clip=1.0,
                lr_at=lambda step: 1.0, step_model=None, desc="train"):
    """One pass over `batches`: returns (predictions, labels, summed loss, next step).
    `step_model` is the compiled model when --compile is on; `model` owns the parameters."""
    step_model = model if step_model is None else step_model
    model.train()
    loss_sum, preds, labels = 0.0, [], []
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_at(step)
        with mixed_precision:
            logits = step_model(batch["input_ids"], batch["lengths"], images=batch.get("images"),
                                image_features=batch.get("image_features"))
            loss = F.cross_entropy(logits.float(), batch["labels"])
        scaler.scale(loss).backward()
        if clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += loss.item() * len(batch["labels"])
        preds.append(logits.argmax(1).cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), loss_sum, step


def build(args, meta, tokenizer, device, run_dir):
    """The model, and the train state when resuming from last.pt."""
    if args.resume:
        model, _, info = load_checkpoint(run_dir / "last.pt", device)
        check_compatible(info, tokenizer, meta)  # the data may have been prepared again since
        return model, info["train_state"]
    cfg = ModelConfig(arch=args.model, num_classes=len(meta["classes"]),
                      vocab_size=tokenizer.get_vocab_size(), max_len=meta["max_len"],
                      input_size=args.input_size, pretrained=not args.no_pretrained,
                      finetune=args.finetune_backbone, n_layers=args.layers, n_heads=args.heads,
                      dropout=args.dropout, cross_attention=not args.no_cross_attention)
    return build_model(cfg).to(device), None


def train(args):
    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores; no-op on CPU
    torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(args.out) / args.run
    if args.resume:
        if not (run_dir / "last.pt").exists():
            raise DataError(f"nothing to resume: {run_dir / 'last.pt'} does not exist")
        saved = json.loads((run_dir / "args.json").read_text())
        for key, value in saved.items():
            if key not in RESUME_MAY_CHANGE:
                setattr(args, key, value)
    elif (run_dir / "last.pt").exists() and not args.overwrite:
        raise DataError(f"{run_dir} already holds a run: pass --resume to continue it, "
                        "--run NAME for a new one, or --overwrite to replace it")
    torch.manual_seed(args.seed)  # model init and dropout
    meta, tokenizer = load_meta(args.data), load_tokenizer(args.data)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    model, state = build(args, meta, tokenizer, device, run_dir)
    use_cache = not (args.no_cache or model.cfg.finetune)
    mixed_precision, amp_dtype = autocast(device, args.amp)
    print(f"torch {torch.__version__} | device {device} | amp {amp_dtype} | "
          f"{'cached features' if use_cache else 'images through the trunk'}")
    print(f"model {args.model}: {describe(model)} | {model.cfg}")
    if not model.cfg.pretrained:
        print("note: random trunk (--no-pretrained): image features are not ImageNet's")

    flip = not args.no_flip
    train_features = val_features = None
    cache_seconds = 0.0
    if use_cache:
        t0 = time.time()
        train_features, path = cached_features(model, train_split["images"], args.cache_dir,
                                               device, flips=flip)
        val_features, _ = cached_features(model, val_split["images"], args.cache_dir, device,
                                          flips=False)
        cache_seconds = time.time() - t0
        print(f"features: {path.parent} ({cache_seconds:.1f} s)")
    text_pool = None if args.no_redraw else load_text_pool(args.data)
    train_batches = Batches(train_split, args.batch_size, device, features=train_features,
                            shuffle=True, flip=flip, text_pool=text_pool, seed=args.seed)
    val_batches = Batches(val_split, 256, device, features=val_features)

    trunk = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("image_encoder.")]
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("image_encoder.")]
    groups = [{"params": head, "base_lr": args.lr}]
    if trunk:  # fine-tuning: a pretrained trunk wants a gentler step than a fresh head
        groups.append({"params": trunk, "base_lr": args.lr * args.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_model = torch.compile(model) if args.compile else model

    # train_seconds: wall time of the epochs plus building the cache, for the results table
    start_epoch, step, best_f1, stale, rows, train_seconds = 1, 0, -1.0, 0, [], cache_seconds
    if state is not None:  # exact resume: every source of randomness picks up where it was
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best_f1, stale = state["epoch"] + 1, state["step"], state["best_f1"], state["stale"]
        train_seconds += state["train_seconds"]
        torch.set_rng_state(state["rng_torch"])
        train_batches.generator.set_state(state["rng_batches"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        with open(run_dir / "log.csv", newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["epoch"]) < start_epoch]
        # drop rows of an epoch that was logged but never checkpointed, then keep appending
        write_log(run_dir / "log.csv", rows)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "args.json", json.dumps(vars(args), indent=2))
        write_log(run_dir / "log.csv", [])

    total_steps = args.epochs * len(train_batches)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.time()
            preds, labels, loss_sum, step = train_epoch(
                model, train_batches, optimizer, scaler, mixed_precision, step=step, clip=args.clip,
                lr_at=lambda i: lr_factor(i, total_steps, args), step_model=step_model,
                desc=f"epoch {epoch}")
            seconds, seen = time.time() - t0, len(labels)
            val, train_scores = evaluate(model, val_batches, mixed_precision), scores(labels, preds)
            row = {"epoch": epoch, "train_loss": loss_sum / seen,
                   "train_accuracy": train_scores["accuracy"],
                   "train_macro_f1": train_scores["macro_f1"],
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "val_macro_f1": val["macro_f1"], "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": seen / seconds, "seconds": seconds}
            train_seconds += seconds
            rows.append({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
            with open(run_dir / "log.csv", "a", newline="") as f:
                csv.DictWriter(f, LOG_COLUMNS, lineterminator="\n").writerow(rows[-1])
            improved = val["macro_f1"] > best_f1
            best_f1, stale = (val["macro_f1"], 0) if improved else (best_f1, stale + 1)
            print(f"epoch {epoch:3d}/{args.epochs} | train loss {row['train_loss']:.4f} "
                  f"acc {row['train_accuracy']:.4f} f1 {row['train_macro_f1']:.4f} | val loss "
                  f"{val['loss']:.4f} acc {val['accuracy']:.4f} f1 {val['macro_f1']:.4f}"
                  f"{' *' if improved else '  '} | lr {row['lr']:.2e} | "
                  f"{row['samples_per_s']:.0f} samples/s | {seconds:.1f} s", flush=True)

            metrics = {"epoch": epoch, "train_accuracy": row["train_accuracy"],
                       "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                       "best_val_accuracy": max(float(r["val_accuracy"]) for r in rows),
                       "best_val_macro_f1": best_f1, "train_seconds": train_seconds}
            common = dict(tokenizer_json=tokenizer.to_str(), classes=meta["classes"],
                          image_size=meta["image_size"], metrics=metrics, args=vars(args))
            if improved:
                save_checkpoint(run_dir / "best.pt", model, **common)
            save_checkpoint(run_dir / "last.pt", model, **common, train_state={
                "epoch": epoch, "step": step, "best_f1": best_f1, "stale": stale,
                "train_seconds": train_seconds,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_batches": train_batches.generator.get_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None})
            if args.patience and stale >= args.patience:
                print(f"early stop: val macro-F1 has not improved for {stale} epochs")
                break
    except KeyboardInterrupt:
        if not (run_dir / "last.pt").exists():
            print(f"\ninterrupted in epoch {epoch}, before any checkpoint: nothing to resume",
                  file=sys.stderr)
            return 130
        print(f"\ninterrupted in epoch {epoch}: {run_dir / 'last.pt'} holds epoch {epoch - 1}. "
              f"Resume with:\n  python train.py --model {args.model} --out {args.out} "
              f"--run {args.run} --resume", file=sys.stderr)
        return 130
    finally:
        if rows:
            plot_curves(rows, run_dir / "curves.png")
    print(f"best val macro-F1 {best_f1:.4f}: {run_dir / 'best.pt'}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (DataError, CheckpointError, PretrainedWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""One training step and what it carries: the run's state, AdamW's parameter groups, the
learning-rate schedule, modality dropout, the weights' moving average, logit adjustment and
MixUp / CutMix of the faces, one epoch of steps;
saving a run's state and restoring it on resume, and calibrating its best checkpoint when it ends.

    from training import Run, make_optimizer, train_epoch
    run = Run(model, model, make_optimizer(model, lr=1e-4), scaler, mixed_precision, batches, None)
    preds, labels, loss_sum = train_epoch(run, clip=1.0)

train.py builds a run from its flags and loops over epochs (evaluating, logging, saving);
bench.py times train_epoch exactly as training runs it.
"""
import copy
import csv
import io
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import load_checkpoint, save_checkpoint
from data import Batches
from distributed import RANK, WORLD_SIZE, from_master, gather
from metrics import ablations, calibration_error, evaluate, fit_temperature, temper
from runtime import DataError, atomic_write, progress

LOG_COLUMNS = ["epoch", "train_loss", "train_accuracy", "train_macro_f1", "val_loss", "val_accuracy",
               "val_macro_f1", "lr", "samples_per_s", "seconds"]


@dataclass
class Counters:
    """Where a run stands after `epoch` epochs; checkpointed, so a resume continues from it."""
    epoch: int = 0
    step: int = 0
    best_f1: float = -1.0
    # epochs since val macro-F1 last improved
    stale: int = 0
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
    # --ema: the weights' moving average (make_ema) and its decay a step
    ema: nn.Module | None = None
    ema_decay: float = 0.0
    # --logit-adjust: added to the logits in the loss alone (class_offsets)
    logit_offsets: torch.Tensor | None = None
    # --mix: torchvision's MixUp or CutMix over each batch of faces (make_mix)
    mix: object = None

    @property
    def kept(self):
        """The model evaluated, calibrated and saved: the moving average under --ema."""
        return self.model if self.ema is None else self.ema


def make_ema(model):
    """A copy of `model` to hold the exponential moving average of its weights (Polyak and
    Juditsky, 1992; timm's ModelEma): evaluated and saved in place of the model that trains."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, over the parameters and the floating buffers
    (a trunk that trains moves BatchNorm's statistics too; the step counts are copied). One
    foreach kernel a device and dtype, nothing read on the host: torch's AveragedModel does the
    same but reads its update count on the host each step, a sync inside the step loop on CUDA."""
    averaged = []
    current = []
    for mine, theirs in zip(ema.state_dict().values(), model.state_dict().values()):
        if mine.is_floating_point():
            averaged.append(mine)
            current.append(theirs)
        else:
            mine.copy_(theirs)
    torch._foreach_lerp_(averaged, current, 1.0 - decay)


def default_backbone_lr_scale(cfg) -> float:
    """The trunk's learning rate / the head's when fine-tuning: a trunk that starts trained (ImageNet's
    weights, or another run's trunk: --trunk-from) wants a gentler step than a fresh head (0.1); a
    random trunk at a tenth of the rate barely moves (1.0)."""
    return 0.1 if cfg.pretrained or cfg.trunk_from else 1.0


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """AdamW groups of the trainable parameters, the head's first: the trunk (image_encoder.*) at
    lr * backbone_lr_scale, the rest at lr, each with `base_lr` for a schedule to scale. Weight decay
    only on weight matrices and kernels: biases and norm scales/shifts (the 1-D parameters) are
    offsets and gains that decay pulls to zero for no regularizing gain, and an embedding row of a
    rare token would decay at every step but learn only when its token appears."""
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


def make_optimizer(model, lr, weight_decay=0.01, backbone_lr_scale=None, device=torch.device("cpu")):
    """AdamW over parameter_groups: no weight decay on biases, norms and embeddings."""
    if backbone_lr_scale is None:
        backbone_lr_scale = default_backbone_lr_scale(model.cfg)
    groups = parameter_groups(model, lr, weight_decay, backbone_lr_scale)
    # fused: one kernel for all parameters. On CUDA it takes the GradScaler's inf check on the
    # device (the unfused step reads it with .item(), a host sync every step); on the CPU it
    # steps ResNet-18 + GRU's 13.6M parameters in 10 ms against 65 ms for torch's default loop
    return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))


def class_offsets(labels, num_classes, tau):
    """Logit adjustment (Menon et al., 2021): tau * log of each class's share of the training
    labels, added to the logits in the loss only. The model then learns logits that the prior no
    longer dominates, and at test time its raw argmax favours rare classes (Disgust) more."""
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
    return tau * (counts / counts.sum()).log()


def make_mix(kind, num_classes):
    """--mix: torchvision's batch transform, MixUp (a blend of two faces) or CutMix (a box of one
    pasted into the other), each with alpha 1 and the labels mixed in the same proportion."""
    from torchvision.transforms import v2
    return {"mixup": v2.MixUp, "cutmix": v2.CutMix}[kind](num_classes=num_classes)


def mix_faces(mix, images, labels):
    """uint8 faces (B, S, S) and labels (B,) -> mixed faces (B, S, S) uint8 and soft targets
    (B, C). torchvision's transforms want (B, C, H, W) and a float blend; the model reads bytes,
    so a MixUp blend is rounded back to them (CutMix moves pixels and rounds nothing)."""
    mixed, targets = mix(images.unsqueeze(1).float(), labels)
    return mixed.squeeze(1).round().to(torch.uint8), targets


def add_extras(run, args, image_size, device, state=None):
    """What train.py's flags add to each step of `run`: the blank face's cached features
    (--modality-dropout from the cache), the logit offsets (--logit-adjust), MixUp or CutMix
    (--mix), the moving average (--ema). `state`: last.pt's train state on resume."""
    model = run.model
    if args.modality_dropout > 0 and run.train_batches.cached and model.cfg.modality == "both":
        run.blank_features = model.image_encoder.blank_features(image_size)
    if args.logit_adjust:
        run.logit_offsets = class_offsets(run.train_batches.split["labels"], model.cfg.num_classes,
                                          args.logit_adjust).to(device)
    if args.mix:
        run.mix = make_mix(args.mix, model.cfg.num_classes)
    if args.ema:
        # on resume last.pt's model is the average, and the train state holds the weights as trained
        run.ema = make_ema(model)
        run.ema_decay = args.ema
        if state is not None:
            model.load_state_dict(state["training_weights"])


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


def train_epoch(run, *, clip=1.0, label_smoothing=0.0, modality_dropout=0.0, lr_at=lambda step: 1.0,
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
        targets = batch["labels"]
        if run.mix is not None:
            batch = dict(batch)
            batch["images"], targets = mix_faces(run.mix, batch["images"], targets)
        with run.mixed_precision:
            logits = run.step_model(batch["input_ids"], batch["lengths"], images=batch.get("images"),
                                    image_features=batch.get("image_features"),
                                    missing_image=batch.get("missing_image"))
            adjusted = logits.float() if run.logit_offsets is None else logits.float() + run.logit_offsets
            summed = F.cross_entropy(adjusted, targets, reduction="sum", label_smoothing=label_smoothing)
        # DDP averages gradients over ranks; scaled so, the average is the gradient of the mean
        # over the whole global batch, even when the ranks' slices differ in size
        scaler.scale(summed * (WORLD_SIZE / batch["global_size"])).backward()
        if clip > 0:
            # clip the true gradients, not the fp16-scaled ones
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        if run.ema is not None:
            update_ema(run.ema, run.model, run.ema_decay)
        optimizer.zero_grad(set_to_none=True)
        run.counters.step += 1
        loss_sum += summed.detach()
        preds.append(logits.argmax(1))
        labels.append(batch["labels"])
    return torch.cat(preds), torch.cat(labels), loss_sum


def write_log(run_dir, rows):
    """log.csv: the header and `rows`, replacing the file whole, so that a crash never leaves a
    row cut short in it."""
    log = io.StringIO()
    writer = csv.DictWriter(log, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(Path(run_dir) / "log.csv") as tmp:
        tmp.write_text(log.getvalue())


def read_log(path):
    """log.csv's rows, as written there. A last row without its newline was cut short by a crash
    (train.py appended rows in place before write_log): it is dropped, not read."""
    text = Path(path).read_text()
    return list(csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1])))


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
            save_checkpoint(run_dir / "best.pt", run.kept, **about, metrics=metrics)
        training_weights = None if run.ema is None else run.model.state_dict()
        save_checkpoint(run_dir / "last.pt", run.kept, **about, metrics=metrics, train_state={
            **asdict(counters), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "rng_batches": run.train_batches.generator.get_state(), "rng": rngs,
            "training_weights": training_weights})

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

"""Checkpoints: save a model with everything needed to use it, load it back, and check
that it fits a prepared data set.

    from checkpoints import load_checkpoint, save_checkpoint
    model, tokenizer, info = load_checkpoint("checkpoints/model_b/best.pt")

A checkpoint is self-contained (model config and weights, tokenizer JSON, class names,
image size, training args, metrics, versions), written atomically and loaded with
`weights_only=True`: no pickled Python objects. The model itself is models.py's.
"""
import dataclasses
import io
from dataclasses import asdict
from pathlib import Path

import tokenizers
import torch
import torchvision

from models import EmotionModel, ModelConfig, build_model
from runtime import atomic_write, one_line

CHECKPOINT_FORMAT = "mm-emotion-checkpoint"
CHECKPOINT_VERSION = 1
# the ModelConfig fields that size a text branch (Model A's GRU, Model B's Transformer)
TEXT_SIZES = ("embed_dim", "gru_hidden", "d_model", "n_layers", "n_heads", "d_ff")


class CheckpointError(ValueError):
    """A checkpoint that is missing, foreign, broken or does not fit the data."""


def _check_storable(value, where: str) -> None:
    # Fail at save time, where the bug is, not when torch.load(weights_only=True) refuses the file.
    if isinstance(value, dict):
        for key, item in value.items():
            _check_storable(key, where)
            _check_storable(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
    # exact types: numpy scalars are refused on load
    elif not (value is None or isinstance(value, (torch.Tensor, torch.dtype))
              or type(value) in (str, int, float, bool)):
        raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint stores only tensors, dicts, "
                        "lists, str, int, float, bool and None")


def save_checkpoint(path, model: EmotionModel, *, tokenizer_json: str, classes: list[str], image_size: int,
                    metrics: dict, args: dict | None = None, train_state: dict | None = None,
                    temperature: float = 1.0) -> None:
    """Write a self-contained checkpoint atomically: a crash never leaves a half-written file.
    `temperature`: the logits' divisor fitted on val after training (1.0: not calibrated)."""
    # a torch.compile wrapper: store the plain names
    model = getattr(model, "_orig_mod", model)
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(model.cfg),
        "model": model.state_dict(), "tokenizer": tokenizer_json, "classes": list(classes),
        "image_size": image_size, "metrics": metrics, "args": args or {}, "train_state": train_state,
        "temperature": float(temperature),
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
                     "tokenizers": tokenizers.__version__},
    }
    _check_storable(checkpoint, "checkpoint")
    try:
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)
    # an unwritable folder, a full disk: torch.save says the latter with a RuntimeError
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"cannot write {path}: {one_line(err)}") from None


def checkpoint_bytes(path) -> bytes:
    """The checkpoint file at `path`, read whole: what load_checkpoint reads, and what global rank 0
    sends the other ranks of a torchrun job (from_master), whose nodes may not hold the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path.read_bytes()


def load_checkpoint(path, device="cpu", data=None):
    """-> (model in eval mode, tokenizers.Tokenizer, info), the model rebuilt from the stored config alone.

    info: classes, config, image_size, metrics, args, train_state, versions, tokenizer (its JSON).
    `data`: the file's bytes (checkpoint_bytes), read elsewhere (by rank 0 of a torchrun job);
    `path` then names it.
    """
    path = Path(path)
    if data is None:
        data = checkpoint_bytes(path)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    # zip, pickle or weights_only errors: all mean "not one of ours"
    except Exception as err:
        # torch's own text invites an unsafe load: do not echo it
        if "Weights only load failed" in str(err):
            raise CheckpointError(f"{path}: holds pickled Python objects, which are never loaded; "
                                  "not a checkpoint of this project") from err
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({one_line(err)})") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no {CHECKPOINT_FORMAT!r} tag); "
                              "train one with train.py")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {checkpoint.get('version')!r}, "
                              f"this code reads version {CHECKPOINT_VERSION}")
    try:
        cfg = ModelConfig(**checkpoint["config"])
        # The checkpoint holds the trunk weights: build without downloading anything.
        model = build_model(dataclasses.replace(cfg, pretrained=False))
        model.cfg = cfg
        model.load_state_dict(checkpoint["model"])
        tokenizer = tokenizers.Tokenizer.from_str(checkpoint["tokenizer"])
        classes = checkpoint["classes"]
    # a config that does not build, weights that do not fit it, a bad tokenizer
    except Exception as err:
        raise CheckpointError(f"{path}: broken checkpoint ({one_line(err)})") from err
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {tokenizer.get_vocab_size()} tokens, "
                              f"its model {cfg.vocab_size}")
    if len(classes) != cfg.num_classes:
        raise CheckpointError(f"{path}: {len(classes)} class names for a {cfg.num_classes}-class model")
    info = {key: checkpoint.get(key) for key in
            ("classes", "config", "image_size", "metrics", "args", "train_state", "versions", "tokenizer")}
    # a checkpoint saved before calibration existed is uncalibrated
    info["temperature"] = checkpoint.get("temperature", 1.0)
    return model.to(device).eval(), tokenizer, info


def check_compatible(info: dict, data_tokenizer, meta: dict) -> None:
    """Refuse a checkpoint whose classes, token ids, image size or sequence length mean
    something else in this data set."""
    if list(info["classes"]) != list(meta["classes"]):
        raise CheckpointError(f"checkpoint classes {info['classes']} differ from the data's {meta['classes']} "
                              "(meta.json): use the data the model was trained on, or retrain")
    if tokenizers.Tokenizer.from_str(info["tokenizer"]).get_vocab() != data_tokenizer.get_vocab():
        raise CheckpointError("the checkpoint's tokenizer differs from the data's tokenizer.json: "
                              "use the data the model was trained on, or retrain")
    if info["image_size"] != meta["image_size"]:
        raise CheckpointError(f"the checkpoint was trained on {info['image_size']}px images, the data has "
                              f"{meta['image_size']}px (meta.json): prepare the data with "
                              f"--image-size {info['image_size']}, or retrain")
    if info["config"]["max_len"] != meta["max_len"]:
        raise CheckpointError(f"the checkpoint reads texts of up to {info['config']['max_len']} tokens, the data "
                              f"holds up to {meta['max_len']} (meta.json): prepare the data with "
                              f"--max-len {info['config']['max_len']}, or retrain")


def load_trunk(model: EmotionModel, path, meta: dict, data=None) -> None:
    """Start `model`'s trunk from the trunk of the checkpoint at `path`: typically an image-only
    run that fine-tuned it on these faces, so that fused runs can train on its cached features.
    `data`: the file's bytes, as load_checkpoint takes them."""
    source, _, info = load_checkpoint(path, data=data)
    if source.image_encoder is None:
        raise CheckpointError(f"--trunk-from {path}: a text-only checkpoint has no trunk")
    trained_at = info["config"]["input_size"]
    if trained_at != model.cfg.input_size:
        raise CheckpointError(f"--trunk-from {path}: its trunk was trained at input {trained_at}, this run "
                              f"has --input-size {model.cfg.input_size}: pass --input-size {trained_at}")
    if info["image_size"] != meta["image_size"]:
        raise CheckpointError(f"--trunk-from {path}: its trunk saw {info['image_size']}px faces, the data has "
                              f"{meta['image_size']}px: use the data it was trained on")
    model.image_encoder.trunk.load_state_dict(source.image_encoder.trunk.state_dict())


def load_text_encoder(model: EmotionModel, path, data_tokenizer, meta: dict, data=None) -> None:
    """Start `model`'s text branch from the one of the checkpoint at `path`: typically a text-only
    run of the same model on these sentences. Trained from scratch beside the face, a fused
    model's text branch learns less than it does alone (Wang et al., CVPR 2020); started
    from that run it begins where the text-only model ended. `data`: as load_trunk's."""
    source, _, info = load_checkpoint(path, data=data)
    if not source.uses_text:
        raise CheckpointError(f"--text-from {path}: an image-only checkpoint has no text branch")
    if source.cfg.arch != model.cfg.arch:
        raise CheckpointError(f"--text-from {path}: a Model {source.cfg.arch.upper()} checkpoint, and this "
                              f"run trains Model {model.cfg.arch.upper()}: their text branches differ")
    try:
        check_compatible(info, data_tokenizer, meta)
    except CheckpointError as err:
        raise CheckpointError(f"--text-from {path}: {err}") from err
    # n_heads splits the same tensors another way: compare the sizes, not only the shapes
    differ = [f"{name} {info['config'][name]} (this run: {getattr(model.cfg, name)})" for name in TEXT_SIZES
              if info["config"][name] != getattr(model.cfg, name)]
    if differ:
        raise CheckpointError(f"--text-from {path}: its text branch was built with {', '.join(differ)}: "
                              "pass the sizes it was trained with (--layers, --heads)")
    model.text_encoder.load_state_dict(source.text_encoder.state_dict())

"""Models A and B: a face image plus a sentence -> one of 7 emotions.

    from models import ModelConfig, build_model, load_checkpoint
    model = build_model(ModelConfig(arch="b", vocab_size=5000))
    logits = model(input_ids, lengths, images=images)          # images: uint8 (B, S, S)
    features = model.image_features(images)                    # cacheable with a frozen trunk
    logits = model(input_ids, lengths, image_features=features)  # the same logits
    model, tokenizer, info = load_checkpoint("checkpoints/model_b/best.pt")

Both models share the image branch (images.ImageEncoder): preprocessing on the
device, then an ImageNet ResNet-18 trunk, frozen by default. Model A reads the text with a GRU
and concatenates; Model B reads it with a Transformer encoder whose tokens
attend over the 7x7 grid of ResNet region tokens (the reference attended to a
single pooled vector, where softmax over one key is always 1).
`ModelConfig(modality="image"|"text")` builds the same branch and head on one
input alone: the single-modality baselines that fusion is measured against.
"""
import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import torchvision
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from data import atomic_write, one_line
from images import IMAGE_DIM, ImageEncoder

CHECKPOINT_FORMAT = "mm-emotion-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, foreign, broken or does not fit the data."""


@dataclass
class ModelConfig:
    arch: str = "b"            # "a" (GRU + concat) | "b" (Transformer + region cross-attention)
    num_classes: int = 7
    vocab_size: int = 5000     # the tokenizer's, pad id 0
    max_len: int = 64          # longest token sequence (B's position embeddings)
    input_size: int = 224      # trunk input resolution (uint8 SxS images are resized to this)
    pretrained: bool = True    # ImageNet weights for the trunk (downloaded by torchvision)
    finetune: bool = False     # False: trunk frozen (no grads, eval mode forever)
    embed_dim: int = 256       # A: token embedding width
    gru_hidden: int = 512      # A: GRU state, the text vector
    d_model: int = 512         # B: width of text tokens, region tokens and the text vector
    n_layers: int = 3          # B: Transformer encoder layers
    n_heads: int = 4           # B: heads in the encoder and in the cross-attention
    d_ff: int = 2048           # B: feed-forward width in the encoder and the cross-attention block
    text_dropout: float = 0.1  # B: inside the Transformer and the cross-attention block
    dropout: float | None = None  # head dropout; None -> 0.5 for A, 0.2 for B (the reference)
    cross_attention: bool = True  # B: False is the reference's ablation (plain concat)
    modality: str = "both"     # "both" | "image" | "text": a single-modality baseline builds one branch
    augment: bool = False      # random views of each face in training mode (images.random_views); never in eval


class GRUTextEncoder(nn.Module):
    """Model A's text branch: the GRU state after each sequence's last real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.embed_dim, cfg.gru_hidden, batch_first=True)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, L, E)
        # Packing makes the GRU stop at each real length (the reference took h[-1] of a padded
        # batch, so padding changed its predictions). An empty text is packed as one pad token
        # and its state zeroed below.
        packed = pack_padded_sequence(x, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
        _, state = self.gru(packed)  # (1, B, H), back in batch order
        return state[0] * (lengths > 0).unsqueeze(1).to(state)  # (B, H); lengths may live on the CPU


class TransformerTextEncoder(nn.Module):
    """Model B's text branch: token + learned position embeddings, Transformer encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_len = cfg.max_len
        self.token = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=0)
        self.position = nn.Embedding(cfg.max_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.text_dropout, batch_first=True)
        # Nested tensors would drop the padded positions in eval mode only: keep one code path.
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens, the model was built for max_len {self.max_len}")
        x = self.token(input_ids) + self.position.weight[:length]  # (B, L, D)
        return self.encoder(x, src_key_padding_mask=ignore)  # (B, L, D); ignore (B, L) True = not attended


class RegionCrossAttention(nn.Module):
    """Text tokens (queries) attend over image region tokens (keys, values), then a feed-forward;
    post-norm like the encoder layers (residual + LayerNorm after each sub-block)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, dropout=cfg.text_dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.feed_forward = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.ReLU(), nn.Dropout(cfg.text_dropout),
                                          nn.Linear(cfg.d_ff, cfg.d_model))
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.text_dropout)

    def forward(self, text: torch.Tensor, regions: torch.Tensor, need_weights: bool = False):
        # text (B, L, D), regions (B, R, D); every region is real, so no key mask is needed.
        attended, weights = self.attention(text, regions, regions, need_weights=need_weights)  # (B, L, D)
        x = self.norm1(text + self.dropout(attended))  # (B, L, D)
        x = self.norm2(x + self.dropout(self.feed_forward(x)))  # (B, L, D)
        return x, weights  # weights (B, L, R) averaged over heads, or None


class EmotionModel(nn.Module):
    """What A and B share: the image branch, the images-or-features forward, the head input.
    A subclass sets `self.head` (its last layer a Linear) and `text_vector()`. A single-modality
    model (cfg.modality "image" or "text") builds one branch only and its head reads that one vector."""

    def __init__(self, cfg: ModelConfig, regions: bool):
        super().__init__()
        self.cfg = cfg
        self.uses_image, self.uses_text = cfg.modality != "text", cfg.modality != "image"
        self.image_encoder = ImageEncoder(cfg, regions) if self.uses_image else None

    def head_width(self, text_dim: int) -> int:
        """Width of the head's input: the pooled image vector and/or the text vector."""
        return (IMAGE_DIM if self.uses_image else 0) + (text_dim if self.uses_text else 0)

    @property
    def cacheable(self) -> bool:
        """Whether the image features are a pure function of the image: a frozen trunk that exists."""
        return self.uses_image and not self.cfg.finetune

    def image_features(self, images: torch.Tensor) -> dict:
        """uint8 (B, S, S) -> {"pooled": (B, 512)[, "regions": (B, HW, 512)]}."""
        if not self.uses_image:
            raise ValueError("a text-only model (modality 'text') has no image branch and no image features")
        return self.image_encoder(images)

    def forward(self, input_ids, lengths, images=None, image_features=None, return_attention=False):
        """input_ids int (B, L), 0 = pad; lengths int (B,); exactly one of images / image_features.
        -> logits (B, C); with return_attention, (logits, attention) where attention is Model B's
        cross-attention weights (B, L, R) over the R image regions, the mean over heads (each
        real token's row sums to 1), or None for a model without cross-attention.
        A text-only model ignores the image arguments, an image-only model the text: the same
        batches serve every modality."""
        features, vectors, attention = None, [], None
        if self.uses_image:
            if (images is None) == (image_features is None):
                raise ValueError("pass exactly one of images= or image_features=")
            if images is not None:
                features = self.image_features(images)
            else:  # a cache may hold float16: compute in the parameters' dtype
                dtype = self.head[-1].weight.dtype
                features = {name: value.to(dtype) for name, value in image_features.items()}
            vectors.append(features["pooled"])  # (B, 512)
        if self.uses_text:
            if input_ids.shape[1] == 0:  # a batch of empty texts trimmed to its longest row
                input_ids = input_ids.new_zeros(input_ids.shape[0], 1)
            text, attention = self.text_vector(input_ids, lengths, features, need_weights=return_attention)
            vectors.append(text)  # (B, T)
        logits = self.head(torch.cat(vectors, dim=1))  # (B, C)
        return (logits, attention) if return_attention else logits


class ModelA(EmotionModel):
    """Pooled image (512) + GRU text (512) -> Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, regions=False)
        if self.uses_text:
            self.text_encoder = GRUTextEncoder(cfg)
        dropout = 0.5 if cfg.dropout is None else cfg.dropout
        self.head = nn.Sequential(nn.Linear(self.head_width(cfg.gru_hidden), 1024), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(1024, cfg.num_classes))

    def text_vector(self, input_ids, lengths, features, need_weights=False):
        return self.text_encoder(input_ids, lengths), None  # (B, H), no attention


class ModelB(EmotionModel):
    """Transformer text tokens attend over the region grid; masked mean; + pooled image -> head."""

    def __init__(self, cfg: ModelConfig):
        attends = cfg.cross_attention and cfg.modality == "both"  # one input alone has nothing to attend to
        super().__init__(cfg, regions=attends)
        self.attends = attends
        if self.uses_text:
            self.text_encoder = TransformerTextEncoder(cfg)
        if attends:
            grid = math.ceil(cfg.input_size / 32)  # each of the trunk's 5 stride-2 steps rounds up
            self.region_projection = nn.Linear(IMAGE_DIM, cfg.d_model)
            self.region_position = nn.Embedding(grid * grid, cfg.d_model)  # where on the face a region is
            self.cross_attention = RegionCrossAttention(cfg)
        dropout = 0.2 if cfg.dropout is None else cfg.dropout
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.head_width(cfg.d_model), cfg.num_classes))

    def text_vector(self, input_ids, lengths, features, need_weights=False):
        lengths = lengths.to(input_ids.device)  # callers keep lengths on the CPU for packing
        real = torch.arange(input_ids.shape[1], device=input_ids.device) < lengths.unsqueeze(1)  # (B, L)
        # An empty text would mask every key and softmax would give NaN: let it attend to its
        # first (pad) position; the masked mean below still excludes it.
        attended = real.clone()
        attended[:, 0] = True
        text = self.text_encoder(input_ids, ~attended)  # (B, L, D)
        attention = None
        if self.attends:
            regions = self.region_projection(features["regions"]) + self.region_position.weight  # (B, R, D)
            text, attention = self.cross_attention(text, regions, need_weights=need_weights)  # (B, L, D), (B, L, R)
        weights = real.unsqueeze(2).to(text.dtype)  # (B, L, 1)
        return (text * weights).sum(1) / weights.sum(1).clamp(min=1), attention  # (B, D), zero for an empty text


def build_model(cfg: ModelConfig) -> EmotionModel:
    if cfg.arch not in ("a", "b"):
        raise ValueError(f"unknown arch {cfg.arch!r}: expected 'a' or 'b'")
    if cfg.modality not in ("both", "image", "text"):
        raise ValueError(f"unknown modality {cfg.modality!r}: expected 'both', 'image' or 'text'")
    return ModelA(cfg) if cfg.arch == "a" else ModelB(cfg)


def default_backbone_lr_scale(cfg: ModelConfig) -> float:
    """The trunk's learning rate / the head's when fine-tuning: ImageNet weights want a gentler step
    than a fresh head (0.1); a random trunk at a tenth of the rate barely moves (1.0)."""
    return 0.1 if cfg.pretrained else 1.0


def parameter_groups(model: EmotionModel, lr: float, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
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


def parameter_counts(model: EmotionModel) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def describe(model: EmotionModel) -> str:
    """One line for the start of a run."""
    trainable, frozen = parameter_counts(model)
    encoder = model.image_encoder
    if encoder is None:
        image = "text only, no image branch"
    else:
        image = "frozen ResNet-18 trunk" if encoder.frozen else "ResNet-18 trunk fine-tuned"
        image += (", augmented" if encoder.augment else "") + ("" if model.uses_text else ", image only")
    return f"{trainable:,} trainable parameters, {frozen:,} frozen ({image})"


def _check_storable(value, where: str) -> None:
    # Fail at save time, where the bug is, not when torch.load(weights_only=True) refuses the file.
    if isinstance(value, dict):
        for key, item in value.items():
            _check_storable(key, where)
            _check_storable(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
    elif not (value is None or isinstance(value, (torch.Tensor, torch.dtype))
              or type(value) in (str, int, float, bool)):  # exact types: numpy scalars are refused on load
        raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint stores only tensors, dicts, "
                        "lists, str, int, float, bool and None")


def save_checkpoint(path, model: EmotionModel, *, tokenizer_json: str, classes: list[str], image_size: int,
                    metrics: dict, args: dict | None = None, train_state: dict | None = None) -> None:
    """Write a self-contained checkpoint atomically: a crash never leaves a half-written file."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: store the plain names
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(model.cfg),
        "model": model.state_dict(), "tokenizer": tokenizer_json, "classes": list(classes),
        "image_size": image_size, "metrics": metrics, "args": args or {}, "train_state": train_state,
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
                     "tokenizers": tokenizers.__version__},
    }
    _check_storable(checkpoint, "checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, tokenizers.Tokenizer, info), the model rebuilt from the stored config alone.

    info: classes, config, image_size, metrics, args, train_state, versions, tokenizer (its JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle or weights_only errors: all mean "not one of ours"
        if "Weights only load failed" in str(err):  # torch's own text invites an unsafe load: do not echo it
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
    except Exception as err:  # a config that does not build, weights that do not fit it, a bad tokenizer
        raise CheckpointError(f"{path}: broken checkpoint ({one_line(err)})") from err
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {tokenizer.get_vocab_size()} tokens, "
                              f"its model {cfg.vocab_size}")
    if len(classes) != cfg.num_classes:
        raise CheckpointError(f"{path}: {len(classes)} class names for a {cfg.num_classes}-class model")
    info = {key: checkpoint.get(key) for key in
            ("classes", "config", "image_size", "metrics", "args", "train_state", "versions", "tokenizer")}
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

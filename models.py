"""Models A and B in full: a face image plus a sentence -> one of 7 emotions.

    from models import ModelConfig, build_model
    model = build_model(ModelConfig(arch="b", vocab_size=5000))
    logits = model(input_ids, lengths, images=images)          # images: uint8 (B, S, S)
    features = model.image_features(images)                    # cacheable with a frozen trunk
    logits = model(input_ids, lengths, image_features=features)  # the same logits

In order: the config, the shared image branch (on-device preprocessing, random training views, the
ResNet-18 trunk, frozen by default), the two text encoders, Model B's cross-attention, the models.
A reads the text with a GRU and concatenates; B's Transformer tokens attend over the trunk's grid of
region tokens (ceil(input/32) per side, 7x7 at 224; the reference attended to one pooled vector, where
softmax over one key is always 1). `ModelConfig(modality="image"|"text")` builds one branch and the
head: the baselines fusion is measured against. Last come the checkpoints: a model saved with
everything needed to use it (config and weights, tokenizer, class names, image size, training
args, metrics, versions), written atomically, loaded back with `weights_only=True`, and checked
against a prepared data set.

    model, tokenizer, info = load_checkpoint("checkpoints/model_b/best.pt")
"""
import dataclasses
import hashlib
import io
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from data import BLANK_PIXEL
from runtime import atomic_write, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODE = "bilinear"  # align_corners=False; fingerprinted
IMAGE_DIM = 512  # channels of ResNet-18's last stage


class PretrainedWeightsError(RuntimeError):
    """The ImageNet trunk weights were asked for but cannot be had."""


@dataclass
class ModelConfig:
    arch: str = "b"            # "a" GRU + concat, "b" Transformer
    num_classes: int = 7
    vocab_size: int = 5000     # the tokenizer's, pad id 0
    max_len: int = 64          # B's position embeddings
    input_size: int = 224      # trunk input side; faces resize to it
    pretrained: bool = True    # download torchvision's ImageNet weights
    trunk_from: str = ""       # or the checkpoint the trunk was copied from
    finetune: bool = False     # False: trunk frozen, in eval mode
    embed_dim: int = 256       # A: token embedding width
    gru_hidden: int = 512      # A: GRU state, the text vector
    embed_dropout: float = 0.0  # on the token embeddings (B: + positions)
    d_model: int = 512         # B: text tokens, regions, text vector
    n_layers: int = 3          # B: Transformer encoder layers
    n_heads: int = 4           # B: encoder and cross-attention heads
    d_ff: int = 2048           # B: both blocks' feed-forward width
    text_dropout: float = 0.1  # B: in the encoder and cross-attention
    dropout: float | None = None  # head; None: A 0.5, B 0.2
    cross_attention: bool = True  # B: False: the reference's concat
    modality: str = "both"     # or "image" | "text": one branch
    augment: bool = False      # random_views in training mode


# ---- the image branch ------------------------------------------------------------
def resnet18_trunk(pretrained: bool) -> nn.Sequential:
    """ResNet-18 without avgpool and fc: (B, 3, s, s) -> (B, 512, ceil(s/32), ceil(s/32))."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        resnet = torchvision.models.resnet18(weights=weights if pretrained else None)
    except (OSError, RuntimeError) as err:
        # URLError is an OSError; a bad file fails its hash or zip check. Never fall back to a
        # random trunk: a model that silently cannot see faces is worse than a stop.
        directory = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise PretrainedWeightsError(
            f"cannot get the ImageNet ResNet-18 weights ({one_line(err)}); "
            f"put {os.path.basename(weights.url)} in {directory}/ ($TORCH_HOME/hub/checkpoints/) "
            f"or pass --no-pretrained to train without them") from err
    return nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                         resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)


def random_views(x: torch.Tensor, size: int) -> torch.Tensor:
    """Training augmentation, one batched resample: gray (B, 1, S, S) in [0, 1] -> (B, 1, size, size).

    Each face gets its own random square crop of 80-100 % of its area at a random position, a
    rotation within +-10 degrees and a horizontal flip (p 0.5); then, with p 0.25, a random
    rectangle (2-33 % of the area, aspect 0.3-3.3, as torchvision's RandomErasing) is erased.
    Crop, rotation, flip and resize are one affine map: one bilinear resample, equal to the
    evaluation resize at zero parameters. On the raw gray channel: a third of the work, and
    fill values that are pixel values.
    """
    batch = x.shape[0]
    u = torch.rand(batch, 10, device=x.device)  # (B, 10): global generator
    side = (0.8 + 0.2 * u[:, 0]).sqrt()  # crop side / image side
    angle = (2 * u[:, 1] - 1) * math.radians(10)
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    shift = (2 * u[:, 3:5] - 1) * (1 - side).unsqueeze(1)  # (B, 2) crop centre, inside
    cos = side * angle.cos()
    sin = side * angle.sin()
    # theta maps output to input coordinates in [-1, 1]: scale * rotation * flip, then the shift.
    theta = torch.stack([torch.stack([flip * cos, -sin, shift[:, 0]], 1),
                         torch.stack([flip * sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [batch, 1, size, size], align_corners=False)  # (B, size, size, 2)
    # Reflection fills the corners a rotation brings in with the face's own edge rather than black,
    # and clamps the outer half pixel exactly as F.interpolate does.
    x = F.grid_sample(x, grid, mode=RESIZE_MODE, padding_mode="reflection", align_corners=False)

    area = 0.02 + 0.31 * u[:, 5]
    aspect = (math.log(3.3) * (2 * u[:, 6] - 1)).exp()  # height / width, log-uniform
    height = (area * aspect).sqrt().clamp(max=1)
    width = (area / aspect).sqrt().clamp(max=1)
    top = u[:, 7] * (1 - height)  # a fraction of the side
    left = u[:, 8] * (1 - width)
    centres = (torch.arange(size, device=x.device) + 0.5) / size  # (size,) in [0, 1]
    rows = (centres >= top[:, None]) & (centres < (top + height)[:, None])  # (B, size)
    columns = (centres >= left[:, None]) & (centres < (left + width)[:, None])  # (B, size)
    erased = rows[:, :, None] & columns[:, None, :] & (u[:, 9] < 0.25)[:, None, None]  # (B, size, size)
    # Filled with the face's own mean: a flat occluder that leaves the image's mean brightness, and
    # so the batch statistics a fine-tuned trunk's BatchNorm tracks, where they were (black would not).
    return torch.where(erased.unsqueeze(1), x.mean(dim=(2, 3), keepdim=True), x)


class ImageEncoder(nn.Module):
    """uint8 gray faces -> pooled vector (and region tokens). Preprocessing lives here, on the
    device, so training, evaluation, the demo and the feature cache cannot preprocess differently."""

    def __init__(self, cfg: ModelConfig, regions: bool):
        super().__init__()
        self.input_size = cfg.input_size
        self.regions = regions  # the grid, for a model attending to it
        self.frozen = not cfg.finetune
        self.augment = cfg.augment
        self.trunk = resnet18_trunk(cfg.pretrained)
        # Constants, not weights: kept out of the state dict, but part of the feature fingerprint.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if self.frozen:
            self.trunk.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        # A frozen trunk keeps its ImageNet BatchNorm statistics even while the rest trains.
        super().train(mode)
        if self.frozen:
            self.trunk.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict:
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(f"images must be uint8 (B, S, S), got {images.dtype} {tuple(images.shape)}")
        x = images.unsqueeze(1).to(self.mean.dtype) / 255  # (B, 1, S, S) in [0, 1]
        if self.augment and self.training:
            x = random_views(x, self.input_size)  # (B, 1, s, s)
        else:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode=RESIZE_MODE, align_corners=False)
        x = (x - self.mean) / self.std  # (B, 3, s, s): gray, 3 normalizations
        if x.is_cuda:
            # cuDNN runs a convolution NHWC when its input or weight is (cudnn_conv_suggest_memory_format
            # in ATen/native/ConvUtils.h) and returns NHWC, which BatchNorm, ReLU and pooling keep:
            # one conversion here makes the whole trunk channels_last, faster on tensor cores.
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad() if self.frozen else nullcontext():
            grid = self.trunk(x)  # (B, 512, h, w), h = w = ceil(s / 32)
        features = {"pooled": grid.mean(dim=(2, 3))}  # (B, 512): the avgpool
        if self.regions:
            features["regions"] = grid.flatten(2).transpose(1, 2)  # (B, h*w, 512)
        return features

    @torch.no_grad()
    def blank_features(self, image_size: int) -> dict:
        """{name: (1, ...)} of one blank face (data.BLANK_PIXEL), read in eval mode whatever the
        mode: what a missing face is to the model, in the ablation and in modality dropout."""
        blank = torch.full((1, image_size, image_size), BLANK_PIXEL, dtype=torch.uint8, device=self.mean.device)
        training = self.training
        features = self.eval()(blank)
        self.train(training)
        return features

    def blank_rows(self, features: dict, missing: torch.Tensor, image_size: int) -> dict:
        """`features` with the rows where `missing` (bool (B,)) replaced by the blank face's: modality
        dropout while the trunk trains. Fed through a training-mode trunk, a blank face would enter
        BatchNorm's statistics: a constant, zero-variance input that never occurs at test time."""
        lost = self.blank_features(image_size)
        return {name: torch.where(missing.view(-1, *[1] * (value.dim() - 1)), lost[name].to(value.dtype), value)
                for name, value in features.items()}

    def fingerprint(self) -> str:
        """sha256 of everything the features depend on: trunk weights, preprocessing, feature kinds.
        Training-mode augmentation is not among them: features are computed in eval mode."""
        digest = hashlib.sha256()
        preprocessing = {"input_size": self.input_size, "mean": self.mean.flatten().tolist(),
                         "std": self.std.flatten().tolist(), "resize": RESIZE_MODE, "align_corners": False,
                         "features": "pooled+regions" if self.regions else "pooled"}
        digest.update(json.dumps(preprocessing, sort_keys=True).encode())
        for name, tensor in self.trunk.state_dict().items():  # BatchNorm statistics too
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


# ---- the text branches and fusion ------------------------------------------------
class GRUTextEncoder(nn.Module):
    """Model A's text branch: the GRU state after each sequence's last real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.dropout = nn.Dropout(cfg.embed_dropout)
        self.gru = nn.GRU(cfg.embed_dim, cfg.gru_hidden, batch_first=True)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # input_ids (B, L), lengths (B,) on the same device
        outputs, _ = self.gru(self.dropout(self.embed(input_ids)))  # (B, L, H)
        # A one-direction GRU's output at step t reads tokens 0..t only: at the last real token, the packed
        # result (the reference took h[-1] of a padded batch), with no host sync that packing would need.
        index = (lengths.long() - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[2])  # (B, 1, H)
        state = outputs.gather(1, index).squeeze(1)  # (B, H)
        return state.masked_fill((lengths == 0).unsqueeze(1), 0.0)  # (B, H); empty: zeros


class TransformerTextEncoder(nn.Module):
    """Model B's text branch: token + learned position embeddings, Transformer encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=0)
        self.position = nn.Embedding(cfg.max_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.embed_dropout)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.text_dropout, batch_first=True)
        # Nested tensors would drop the padded positions in eval mode only: keep one code path.
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) token + position embeddings, as A's `embed` gives tokens."""
        length = input_ids.shape[1]
        if length > self.position.num_embeddings:  # ModelConfig.max_len
            raise ValueError(f"{length} tokens: the model was built for max_len {self.position.num_embeddings}")
        return self.token(input_ids) + self.position.weight[:length]

    def forward(self, input_ids: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.dropout(self.embed(input_ids)), src_key_padding_mask=ignore)  # (B, L, D); True = pad


class RegionCrossAttention(nn.Module):
    """Text tokens (queries) attend over image region tokens (keys, values), then a feed-forward;
    post-norm like the encoder layers (residual + LayerNorm after each sub-block)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, dropout=cfg.text_dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.feed_forward = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.ReLU(),
                                          nn.Dropout(cfg.text_dropout), nn.Linear(cfg.d_ff, cfg.d_model))
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.text_dropout)

    def forward(self, text: torch.Tensor, regions: torch.Tensor, need_weights: bool = False):
        # text (B, L, D), regions (B, R, D); every region is real, so no key mask is needed.
        attended, weights = self.attention(text, regions, regions, need_weights=need_weights)  # (B, L, D)
        x = self.norm1(text + self.dropout(attended))  # (B, L, D)
        x = self.norm2(x + self.dropout(self.feed_forward(x)))  # (B, L, D)
        return x, weights  # weights: (B, L, R) head mean, or None


class EmotionModel(nn.Module):
    """What A and B share: the image branch, the images-or-features forward, the head input.
    A subclass sets `self.head` (its last layer a Linear) and `text_vector()`. A single-modality
    model (cfg.modality "image" or "text") builds one branch only and its head reads that one vector."""

    def __init__(self, cfg: ModelConfig, regions: bool):
        super().__init__()
        self.cfg = cfg
        self.uses_image = cfg.modality != "text"
        self.uses_text = cfg.modality != "image"
        self.image_encoder = ImageEncoder(cfg, regions) if self.uses_image else None

    def head_width(self, text_dim: int) -> int:
        """Width of the head's input: the pooled image vector and/or the text vector."""
        return (IMAGE_DIM if self.uses_image else 0) + (text_dim if self.uses_text else 0)

    @property
    def cacheable(self) -> bool:
        """Whether the image features are a pure function of the image: a frozen trunk that exists."""
        return self.uses_image and not self.cfg.finetune

    def feature_fingerprint(self) -> str:
        """The image features' cache key part: ImageEncoder.fingerprint()."""
        if not self.uses_image:
            raise ValueError("a text-only model (modality 'text') has no image features to fingerprint")
        return self.image_encoder.fingerprint()

    def image_features(self, images: torch.Tensor) -> dict:
        """uint8 (B, S, S) -> {"pooled": (B, 512)[, "regions": (B, HW, 512)]}."""
        if not self.uses_image:
            raise ValueError("a text-only model (modality 'text') has no image branch and no image features")
        return self.image_encoder(images)

    def forward(self, input_ids, lengths, images=None, image_features=None, return_attention=False,
                missing_image=None):
        """input_ids int (B, L), 0 = pad; lengths int (B,); exactly one of images / image_features;
        missing_image bool (B,): faces lost to modality dropout (ImageEncoder.blank_rows).
        -> logits (B, C); with return_attention, (logits, attention): Model B's cross-attention
        weights (B, L, R) over the R regions, the mean over heads (each real token's row sums to
        1), or None. A text-only model ignores the images, an image-only model the text."""
        features, attention, vectors = None, None, []
        if self.uses_image:
            if (images is None) == (image_features is None):
                raise ValueError("pass exactly one of images= or image_features=")
            if images is not None:
                features = self.image_features(images)
                if missing_image is not None:
                    features = self.image_encoder.blank_rows(features, missing_image, images.shape[-1])
            else:
                # a cache may hold float16: compute in the parameters' dtype
                features = {name: value.to(self.head[-1].weight.dtype) for name, value in image_features.items()}
            vectors.append(features["pooled"])  # (B, 512)
        if self.uses_text:
            if input_ids.shape[1] == 0:  # empty texts, trimmed to width 0
                input_ids = input_ids.new_zeros(input_ids.shape[0], 1)
            # data.Batches puts lengths on the device already; the demo's may be on the host
            lengths = lengths.to(input_ids.device)
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
        attends = cfg.cross_attention and cfg.modality == "both"  # one input: nothing to attend
        super().__init__(cfg, regions=attends)
        self.attends = attends
        if self.uses_text:
            self.text_encoder = TransformerTextEncoder(cfg)
        if attends:
            grid = math.ceil(cfg.input_size / 32)  # 5 stride-2 steps round up
            self.region_projection = nn.Linear(IMAGE_DIM, cfg.d_model)
            self.region_position = nn.Embedding(grid * grid, cfg.d_model)  # where on the face
            self.cross_attention = RegionCrossAttention(cfg)
        dropout = 0.2 if cfg.dropout is None else cfg.dropout
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.head_width(cfg.d_model), cfg.num_classes))

    def text_vector(self, input_ids, lengths, features, need_weights=False):
        # masks made on the device of input_ids and lengths: no copy
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        real = positions < lengths.unsqueeze(1)  # (B, L)
        # An empty text would mask every key and softmax would give NaN: let it attend to its
        # first (pad) position; the masked mean below still excludes it.
        attended = real | (positions == 0)  # (B, L)
        text = self.text_encoder(input_ids, ~attended)  # (B, L, D)
        attention = None
        if self.attends:
            regions = self.region_projection(features["regions"]) + self.region_position.weight  # (B, R, D)
            text, attention = self.cross_attention(text, regions, need_weights=need_weights)  # (B, L, D), (B, L, R)
        weights = real.unsqueeze(2).to(text.dtype)  # (B, L, 1)
        vector = (text * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D); 0 if empty
        return vector, attention


def build_model(cfg: ModelConfig) -> EmotionModel:
    if cfg.arch not in ("a", "b"):
        raise ValueError(f"unknown arch {cfg.arch!r}: expected 'a' or 'b'")
    if cfg.modality not in ("both", "image", "text"):
        raise ValueError(f"unknown modality {cfg.modality!r}: expected 'both', 'image' or 'text'")
    return ModelA(cfg) if cfg.arch == "a" else ModelB(cfg)


def parameter_counts(model: EmotionModel) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


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


# Checkpoints
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
    # the bytes that were loaded, for a key of what a prediction depends on (recognizer.fingerprint)
    info["sha256"] = hashlib.sha256(data).hexdigest()
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
                              "pass the sizes it was trained with (--layers)")
    model.text_encoder.load_state_dict(source.text_encoder.state_dict())

"""Face images: reading them, finding and cropping the faces in photos, and the image branch
that both models share (preprocessing, training views, the ResNet-18 trunk).

    from images import read_image, load_photo, to_gray, detect_faces, face_square, crop_square
    face = read_image("face.png", 75)           # uint8 (75, 75): how training images enter
    photo = load_photo("IMG_0042.jpg")           # uint8 (H, W[, 3]), upright, full resolution
    gray = to_gray(photo)                         # uint8 (H, W)
    boxes = detect_faces(gray)                    # [(x, y, w, h), ...], largest first
    crop = crop_square(gray, face_square(boxes[0], gray.shape), 75)  # cropped like the training faces

prepare_data.py and demo.py both read images here, so a photo and a training image are
decoded the same way. The training faces are tight, aligned crops; a photo's face is
cropped to match them before the model sees it (demo.py). ImageEncoder turns uint8 faces
into trunk features on the device, so training, evaluation, the demo and the feature cache
cannot preprocess differently.
"""
import hashlib
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import DataError, one_line

# Crop side = (1 + FACE_MARGIN) x the detector's box side, centred on the box. Measured by
# pasting training-style face crops, enlarged to 150 px, into a 450 px frame of their own
# background and asking the cascade for them back: over 140 synthetic faces (20 a class,
# 117 found) the median crop/box ratio was 1.35 (quartiles 1.26-1.44), the box centred on
# the crop (offset < 0.01 box side); a RAF-DB-style crop of the test photo gave 1.33.
FACE_MARGIN = 0.35
DETECT_SIDE = 640  # detect on a copy whose long side is at most this: the cascade's time grows with pixels
# A face whose square would cover this share of the short side already fills the frame: the
# image is a face crop, used whole (its centre square) rather than padded around the box.
FILLS_FRAME = 0.9
CASCADE = "haarcascade_frontalface_default.xml"  # shipped in opencv-python-headless 4.x (cv2.data)


def load_photo(path):
    """Any image Pillow opens -> uint8 (H, W) gray or (H, W, 3) RGB at full resolution, as a
    viewer shows it: EXIF orientation applied, 16-bit gray scaled to 8 bits (not clipped),
    palette and alpha images composited onto white."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # phones store pixels sideways plus an EXIF turn
            if image.mode.startswith("I"):  # 16-bit gray (I;16, I;16B, I): keep its high byte
                return (np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
                # Transparent pixels hold arbitrary (often black) color: show them as white paper.
                white = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(white, image.convert("RGBA"))
            image = image.convert("L" if image.mode in ("1", "L", "F") else "RGB")
            return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy wants one
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Image.DecompressionBombError as err:  # a few bytes that decode to gigabytes
        raise DataError(f"{path}: too many pixels to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path} is not an image Pillow can read ({err})") from None


def to_gray(photo):
    """uint8 (H, W) or (H, W, 3) -> uint8 (H, W), with Pillow's luma weights (ITU-R 601)."""
    from PIL import Image
    return photo if photo.ndim == 2 else np.array(Image.fromarray(photo).convert("L"))


def resize_square(gray, size):
    """uint8 (s, s) -> uint8 (size, size): Pillow bilinear, antialiased when shrinking."""
    from PIL import Image
    if gray.shape == (size, size):
        return gray
    return np.array(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR))


def read_image(path, size):
    """Any image Pillow opens -> uint8 [size, size] gray: how training images enter
    (prepare_data.py). They are face crops already, so the whole image is resized."""
    return resize_square(to_gray(load_photo(path)), size)


def detect_faces(gray):
    """Frontal faces in a uint8 (H, W) image -> [(x, y, w, h), ...] in its pixels, largest first.
    OpenCV is imported here: training and evaluation never need it."""
    import cv2
    # Shrink by a whole factor k (the mean of each k x k block): OpenCV's fast path, 4 ms for
    # 12 megapixels where a fractional INTER_AREA takes 50. The < k dropped edge pixels never matter.
    k = -(-max(gray.shape) // DETECT_SIDE)
    height, width = gray.shape[0] // k, gray.shape[1] // k
    small = cv2.resize(gray[:height * k, :width * k], (width, height), interpolation=cv2.INTER_AREA)
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, CASCADE))
    # minSize 24: the cascade's own window. minNeighbors 8, not the usual 5: with 5, two copies of
    # the test photo side by side also gave two boxes on the space suit; 8 still finds 117 of the 120
    # synthetic faces that 5 finds (the FACE_MARGIN measurement).
    found = cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=8, minSize=(24, 24))
    boxes = [tuple(int(v) * k for v in box) for box in found]
    return sorted(boxes, key=lambda box: -box[2] * box[3])


def centre_square(shape):
    """(x, y, side) of the largest centred square of an (H, W) image: a crop, never a stretch."""
    height, width = shape[:2]
    side = min(height, width)
    return (width - side) // 2, (height - side) // 2, side


def face_square(box, shape):
    """(x, y, side) of the training-style square around a face box (x, y, w, h); it may
    reach past the image edges. A face that fills the frame gives the centre square."""
    x, y, w, h = box
    side = round((1 + FACE_MARGIN) * max(w, h))
    if side >= FILLS_FRAME * min(shape[:2]):
        return centre_square(shape)
    return round(x + (w - side) / 2), round(y + (h - side) / 2), side


def crop_square(gray, square, size):
    """uint8 (H, W) + (x, y, side) -> uint8 (size, size); where the square leaves the image its
    edge pixels are replicated (a flat border, not a black frame the model never saw)."""
    x, y, side = square
    height, width = gray.shape
    inside = gray[max(y, 0):min(y + side, height), max(x, 0):min(x + side, width)]
    pad = ((max(-y, 0), max(y + side - height, 0)), (max(-x, 0), max(x + side - width, 0)))
    return resize_square(np.pad(inside, pad, mode="edge"), size)  # pads only the small crop


# The image branch of both models: preprocessing, training views and the ResNet-18 trunk.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODE = "bilinear"  # with align_corners=False; part of the feature fingerprint
IMAGE_DIM = 512  # channels of ResNet-18's last stage


class PretrainedWeightsError(RuntimeError):
    """The ImageNet trunk weights were asked for but cannot be had."""


def resnet18_trunk(pretrained: bool) -> nn.Sequential:
    """ResNet-18 without avgpool and fc: (B, 3, s, s) -> (B, 512, ceil(s/32), ceil(s/32))."""
    import torchvision  # here: prepare_data.py reads images through this module and never needs it
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        resnet = torchvision.models.resnet18(weights=weights if pretrained else None)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad file fails its hash or zip check
        # Never fall back to a random trunk: a model that silently cannot see faces is worse than a stop.
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
    Crop, rotation, flip and the resize to the trunk's input are one affine map, so the face is
    resampled once, bilinearly like the evaluation resize, which it equals at zero parameters.
    It runs on the unnormalized single gray channel: a third of the work of the 3 normalized
    channels, and its fill values are pixel values.
    """
    batch = x.shape[0]
    u = torch.rand(batch, 10, device=x.device)  # (B, 10): torch's global generator of the device
    side = (0.8 + 0.2 * u[:, 0]).sqrt()  # crop side / image side
    angle = (2 * u[:, 1] - 1) * math.radians(10)
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    shift = (2 * u[:, 3:5] - 1) * (1 - side).unsqueeze(1)  # (B, 2) crop centre; the crop stays inside
    cos, sin = side * angle.cos(), side * angle.sin()
    # theta maps output to input coordinates in [-1, 1]: scale * rotation * flip, then the shift.
    theta = torch.stack([torch.stack([flip * cos, -sin, shift[:, 0]], 1),
                         torch.stack([flip * sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [batch, 1, size, size], align_corners=False)  # (B, size, size, 2)
    # Reflection fills the corners a rotation brings in with the face's own edge rather than black,
    # and clamps the outer half pixel exactly as F.interpolate does.
    x = F.grid_sample(x, grid, mode=RESIZE_MODE, padding_mode="reflection", align_corners=False)

    area = 0.02 + 0.31 * u[:, 5]
    aspect = (math.log(3.3) * (2 * u[:, 6] - 1)).exp()  # height / width, log-uniform
    height, width = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    top, left = u[:, 7] * (1 - height), u[:, 8] * (1 - width)  # fractions of the side
    centres = (torch.arange(size, device=x.device) + 0.5) / size  # (size,) pixel centres in [0, 1]
    rows = (centres >= top[:, None]) & (centres < (top + height)[:, None])  # (B, size)
    columns = (centres >= left[:, None]) & (centres < (left + width)[:, None])  # (B, size)
    erased = rows[:, :, None] & columns[:, None, :] & (u[:, 9] < 0.25)[:, None, None]  # (B, size, size)
    # Filled with the face's own mean: a flat occluder that leaves the image's mean brightness, and
    # so the batch statistics a fine-tuned trunk's BatchNorm tracks, where they were (black would not).
    return torch.where(erased.unsqueeze(1), x.mean(dim=(2, 3), keepdim=True), x)


class ImageEncoder(nn.Module):
    """uint8 gray faces -> pooled vector (and region tokens). Preprocessing lives here, on the
    device, so training, evaluation, the demo and the feature cache cannot preprocess differently."""

    def __init__(self, cfg, regions: bool):  # cfg: a models.ModelConfig
        super().__init__()
        self.input_size = cfg.input_size
        self.regions = regions  # only models that attend to the grid need (and cache) it
        self.frozen = not cfg.finetune
        self.augment = cfg.augment
        self.trunk = resnet18_trunk(cfg.pretrained)
        # Constants, not weights: kept out of the state dict, but part of the feature fingerprint.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if self.frozen:
            self.trunk.requires_grad_(False)
            self.trunk.eval()

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
        x = (x - self.mean) / self.std  # (B, 3, s, s): gray copied to 3 channels, each with its own statistics
        if x.is_cuda:
            # cuDNN runs a convolution NHWC when its input or weight is (cudnn_conv_suggest_memory_format
            # in ATen/native/ConvUtils.h) and returns NHWC, which BatchNorm, ReLU and pooling keep:
            # one conversion here makes the whole trunk channels_last, faster on tensor cores.
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad() if self.frozen else nullcontext():
            grid = self.trunk(x)  # (B, 512, h, w), h = w = ceil(s / 32): 7 at 224
        features = {"pooled": grid.mean(dim=(2, 3))}  # (B, 512), the trunk's own avgpool
        if self.regions:
            features["regions"] = grid.flatten(2).transpose(1, 2)  # (B, h*w, 512)
        return features


def feature_fingerprint(model) -> str:
    """sha256 of everything image features depend on: trunk weights, preprocessing, feature kinds.
    Training-mode augmentation is not among them: features are computed in eval mode."""
    encoder = model.image_encoder
    if encoder is None:
        raise ValueError("a text-only model (modality 'text') has no image features to fingerprint")
    digest = hashlib.sha256()
    preprocessing = {"input_size": encoder.input_size, "mean": encoder.mean.flatten().tolist(),
                     "std": encoder.std.flatten().tolist(), "resize": RESIZE_MODE, "align_corners": False,
                     "features": "pooled+regions" if encoder.regions else "pooled"}
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    for name, tensor in encoder.trunk.state_dict().items():  # BatchNorm statistics included
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

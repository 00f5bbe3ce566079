"""images.py: one reader for every image, faces found in a real photo and cropped like the training
data; the image branch both models share (the offline pretrained error, the feature fingerprint, the
random training views, channels_last on CUDA)."""
import struct
import time
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import images
import models
from models import build_model
from runtime import DataError
from test_models import batch, small_config, small_model
from images import (FACE_MARGIN, centre_square, crop_square, detect_faces, face_crops, face_square, load_photo,
                    read_image, to_gray)

PHOTO = Path(__file__).resolve().parent / "fixtures" / "astronaut.jpg"  # 320 x 320, one face
HAND_BOX = (112, 47, 55, 62)  # the face measured by eye on the photo: cheek to cheek, hairline to chin


def iou(a, b):
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def bomb_png(path, side=20000):
    """A valid PNG header for side x side pixels (over Pillow's bomb limit) with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit gray
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_detector_finds_the_one_face():
    boxes = detect_faces(to_gray(load_photo(PHOTO)))
    assert len(boxes) == 1 and iou(boxes[0], HAND_BOX) >= 0.5


def test_boxes_of_a_large_photo_are_in_its_own_pixels():
    # Detection runs on a copy shrunk by a whole factor (here 4): boxes must be scaled back.
    canvas = np.full((1500, 2000), 128, np.uint8)
    canvas[300:1260, 700:1660] = np.array(Image.open(PHOTO).convert("L").resize((960, 960)))
    boxes = detect_faces(canvas)
    expected = (700 + 3 * HAND_BOX[0], 300 + 3 * HAND_BOX[1], 3 * HAND_BOX[2], 3 * HAND_BOX[3])
    assert len(boxes) == 1 and iou(boxes[0], expected) >= 0.5


@pytest.mark.parametrize("orientation,stored", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_gives_the_same_box(tmp_path, orientation, stored):
    # A phone stores the sensor's pixels sideways and an EXIF tag that says how to turn them.
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"turned{orientation}.jpg"
    Image.open(PHOTO).transpose(stored).save(path, exif=exif, quality=95)
    assert detect_faces(to_gray(load_photo(path))) == detect_faces(to_gray(load_photo(PHOTO)))


def test_two_copies_side_by_side_give_two_faces_largest_first():
    photo = to_gray(load_photo(PHOTO))
    small = np.array(Image.fromarray(photo).resize((240, 240)))
    canvas = np.full((320, 560), 128, np.uint8)
    canvas[:, :320], canvas[40:280, 320:] = photo, small
    boxes = detect_faces(canvas)
    assert len(boxes) == 2
    assert iou(boxes[0], HAND_BOX) >= 0.5 and boxes[1][0] > 320  # the full-size face first
    assert boxes[0][2] > boxes[1][2]


def test_gradient_has_no_face():
    assert detect_faces(np.tile(np.linspace(0, 255, 400).astype(np.uint8), (300, 1))) == []


@pytest.mark.parametrize("shape", [(1, 1000), (30, 30000), (20000, 2), (10, 10)])
def test_a_thin_or_tiny_image_has_no_face(shape):
    # Shrunk for detection, a side can fall under the detector's window, or to 0 pixels
    # (OpenCV's resize raised on that: issue 54).
    gray = np.tile(np.linspace(0, 255, shape[1]).astype(np.uint8), (shape[0], 1))
    assert detect_faces(gray) == []


def test_an_image_too_small_to_hold_a_face_is_refused(tmp_path):
    sliver = tmp_path / "sliver.png"
    Image.fromarray(np.full((1, 1000), 128, np.uint8)).save(sliver)
    for image in (sliver, str(sliver), np.full((1, 1000), 128, np.uint8), np.full((23, 200, 3), 128, np.uint8)):
        with pytest.raises(DataError, match="too small to hold a face"):
            images.as_photo(image)
    with pytest.raises(DataError, match=f"{sliver} is too small to hold a face \\(1000x1 pixels"):
        images.as_photo(sliver)
    assert images.as_photo(np.full((24, 200), 128, np.uint8)).shape == (24, 200)


def test_face_square_adds_the_margin_and_a_filled_frame_is_used_whole():
    side = round(100 * (1 + FACE_MARGIN))
    corner = round(200 + (100 - side) / 2)
    assert face_square((200, 200, 100, 100), (1000, 1000)) == (corner, corner, side)
    # A face crop already: the square around its box would nearly cover the frame.
    assert face_square((5, 3, 75, 75), (80, 90)) == centre_square((80, 90)) == (5, 0, 80)


def test_face_margin_is_the_one_measured_on_real_faces():
    # Real FER2013 crops came back from the detector at a crop/box side of 1.03 (median;
    # quartiles 0.98-1.12); the synthetic faces' 1.35 is outside that range.
    assert 0.98 <= 1 + FACE_MARGIN <= 1.12


def test_face_crops_of_a_photo_and_of_an_image_without_detection():
    gray = to_gray(load_photo(PHOTO))
    boxes, squares, crops = face_crops(gray, 48)
    assert boxes == detect_faces(gray) and len(boxes) == 1
    assert squares == [face_square(boxes[0], gray.shape)]
    assert crops.shape == (1, 48, 48) and crops.dtype == np.uint8
    assert (crops[0] == crop_square(gray, squares[0], 48)).all()
    boxes, squares, crops = face_crops(gray, 48, detect=False)
    assert boxes == [] and squares == [centre_square(gray.shape)] and crops.shape == (1, 48, 48)


def test_crop_past_the_edge_replicates_the_edge_pixels():
    gray = np.arange(100, dtype=np.uint8).reshape(10, 10)
    crop = crop_square(gray, (-5, 5, 10), 10)  # 5 columns left of the image, 5 rows below it
    assert (crop[:5, :5] == gray[5:, :1]).all()  # the left edge column, repeated
    assert (crop[5:, 5:] == gray[9:, :5]).all()  # the bottom row, repeated
    assert (crop[:5, 5:] == gray[5:, :5]).all()  # the part inside, untouched


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    eight = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint16)
    Image.fromarray(eight * 257).save(tmp_path / "deep.png")  # full 16-bit range
    Image.fromarray(eight * 256).save(tmp_path / "shifted.png")  # 8 bits in the high byte
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert (load_photo(tmp_path / "deep.png") == eight).all()
    assert (load_photo(tmp_path / "shifted.png") == eight).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_white(tmp_path, mode):
    # Left half opaque gray 90; right half transparent, its color stored as black (as exporters do).
    if mode == "P":
        image, extra = Image.new("P", (20, 20), 0), {"transparency": 0}  # palette entry 0 is transparent
        image.putpalette([0, 0, 0, 90, 90, 90])
        image.paste(1, (0, 0, 10, 20))
    else:
        image, extra = Image.new("RGBA", (20, 20), (0, 0, 0, 0)), {}
        image.paste((90, 90, 90, 255), (0, 0, 10, 20))
        image = image.convert(mode)
    image.save(tmp_path / "clear.png", **extra)
    gray = read_image(tmp_path / "clear.png", 20)
    assert (gray[:, 11:] == 255).all() and (gray[:, :9] == 90).all()


def test_bad_files_are_data_errors(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    for path, words in [(bomb_png(tmp_path / "bomb.png"), "too many pixels"),
                        (tmp_path / "notes.png", "not an image"), (tmp_path / "none.png", "no such file"),
                        ("", "an empty image path"), (" ", "an empty image path")]:
        with pytest.raises(DataError, match=words):
            read_image(path, 75)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "I;16"])
def test_a_pil_image_or_an_array_reads_as_its_file_does(tmp_path, mode):
    # as_photo: what the recognizer accepts in place of a path, decoded the same way
    image = Image.open(PHOTO).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray(np.array(image.convert("L")).astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(tmp_path / "photo.png")
    from_file = load_photo(tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.png") as opened:
        assert np.array_equal(images.as_photo(opened), from_file)
    assert np.array_equal(images.as_photo(from_file), from_file)
    assert np.array_equal(images.as_photo(str(tmp_path / "photo.png")), from_file)
    for bad, words in [(np.zeros((5, 5, 2), np.uint8), "must be uint8"), (np.zeros((0, 5), np.uint8), "empty"),
                       (np.zeros((5, 5)), "must be uint8"), (b"bytes", "not a bytes")]:
        with pytest.raises(DataError, match=words):
            images.as_photo(bad)


def test_offline_pretrained_build_fails_fast_with_a_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # The real download function, made to fail like a machine without network does.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    start = time.perf_counter()
    with pytest.raises(models.PretrainedWeightsError) as caught:
        build_model(small_config("a", pretrained=True))
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message and "--no-pretrained" in message and "\n" not in message
    assert f"{tmp_path / 'hub' / 'checkpoints'}/" in message


def test_feature_fingerprint_tracks_trunk_and_preprocessing():
    fingerprint = models.EmotionModel.feature_fingerprint
    model = small_model("b")
    assert fingerprint(model) == fingerprint(small_model("b", n_layers=1))  # text side is irrelevant
    assert fingerprint(model) != fingerprint(small_model("b", input_size=96))
    assert fingerprint(model) != fingerprint(small_model("a"))  # pooled only vs pooled + regions
    assert fingerprint(model) != fingerprint(small_model("b", seed=1))
    assert fingerprint(model) == fingerprint(small_model("b", augment=True))  # features are eval-mode
    assert fingerprint(small_model("b", modality="image")) == fingerprint(small_model("a"))  # pooled only
    with pytest.raises(ValueError, match="text-only"):
        fingerprint(small_model("b", modality="text"))
    with torch.no_grad():
        model.image_encoder.trunk[0].weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(model) != fingerprint(small_model("b"))


def test_augmentation_gives_each_training_face_its_own_view_and_leaves_evaluation_alone():
    augmented, plain = small_model("a", augment=True), small_model("a")
    encoder = augmented.image_encoder
    seen = []
    encoder.trunk.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids, lengths, images = batch(size=8)
    same_face = images[:1].expand(8, -1, -1)
    encoder.train()(same_face)
    encoder.eval()(same_face)
    trained, evaluated = seen
    assert trained.shape == evaluated.shape == (8, 3, 64, 64)
    assert all((trained[i] - trained[j]).abs().max() > 0.1 for i in range(8) for j in range(i))  # per-sample views
    assert all(torch.equal(evaluated[i], evaluated[0]) for i in range(8))
    # The random draws come from torch's global generator: restoring its state replays them.
    state = torch.get_rng_state()
    first = encoder.train()(images)["pooled"]
    torch.set_rng_state(state)
    assert torch.equal(encoder(images)["pooled"], first)
    with torch.no_grad():
        assert torch.equal(augmented.eval()(ids, lengths, images=images), plain.eval()(ids, lengths, images=images))


def test_random_views_at_chosen_parameters(monkeypatch):
    """Zero parameters give the evaluation resize exactly; a flip is a mirror; an erased
    rectangle sits where its parameters say and holds the face's mean."""
    x = torch.rand(2, 1, 75, 75, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False)
    # columns: crop scale, angle, flip, shift x, shift y, erase area, aspect, top, left, erase
    identity = torch.tensor([1.0, 0.5, 1.0, 0.5, 0.5, 0.0, 0.5, 0.0, 0.0, 1.0])
    parameters = torch.stack([identity, identity])
    monkeypatch.setattr(torch, "rand", lambda *shape, device=None: parameters.clone())
    assert torch.allclose(models.random_views(x, 96), resized, atol=1e-5)
    parameters[1, 2] = 0.0  # flip the second face
    views = models.random_views(x, 96)
    assert torch.allclose(views[0], resized[0], atol=1e-5) and torch.allclose(views[1], resized[1].flip(-1), atol=1e-5)
    # erase 25 % of the area from the first face, as a square at the top left
    parameters[:, 2], parameters[0, 9] = 1.0, 0.0
    parameters[0, 5] = (0.25 - 0.02) / 0.31
    views = models.random_views(x, 96)
    assert torch.allclose(views[0, :, :48, :48], resized[0].mean().expand(1, 48, 48), atol=1e-5)
    assert torch.allclose(views[0, :, 48:], resized[0, :, 48:], atol=1e-5)
    assert torch.allclose(views[1], resized[1], atol=1e-5)


def test_trunk_is_fed_channels_last_on_cuda():
    # No GPU here: fake CUDA tensors carry the strides the CUDA kernels would produce, without
    # memory or a device; the fake convolution asks this torch build's own backend choice.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(), torch.device("cuda"):
        encoder = models.ImageEncoder(small_config("b", finetune=True, augment=True), regions=True).train()
        seen = []
        encoder.trunk.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
        features = encoder(torch.empty(4, 75, 75, dtype=torch.uint8))
    trunk_input, grid = seen[0]
    assert trunk_input.is_cuda and trunk_input.is_contiguous(memory_format=torch.channels_last)
    if torch.backends.cudnn.is_available():  # a CUDA build: cuDNN then runs every layer NHWC
        assert grid.is_contiguous(memory_format=torch.channels_last)
    assert features["regions"].shape == (4, 4, 512)

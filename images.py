"""Face images: reading them, and finding and cropping the faces in photos.

    from images import read_image, load_photo, as_photo, to_gray, detect_faces, face_square, crop_square
    face = read_image("face.png", 75)           # uint8 (75, 75): how training images enter
    photo = load_photo("IMG_0042.jpg")           # uint8 (H, W[, 3]), upright, full resolution
    photo = as_photo(pil_image_or_array)          # the same from a PIL image or a uint8 array
    gray = to_gray(photo)                         # uint8 (H, W)
    boxes = detect_faces(gray)                    # [(x, y, w, h), ...], largest first
    crop = crop_square(gray, face_square(boxes[0], gray.shape), 75)  # cropped like the training faces
    boxes, squares, crops = face_crops(gray, 75)  # every face at once, the centre square if none

prepare_data.py and the recognizer (recognizer.py, behind demo.py and evaluate.py --pairs)
both read images here, so a photo and a training image are decoded the same way. The
training faces are tight, aligned crops; a photo's face is cropped to match them before the
model sees it. What happens to a face after that (preprocessing, the trunk) belongs to the
model: models.ImageEncoder.
"""
import functools
import os

import numpy as np

from runtime import DataError

# Crop side = (1 + FACE_MARGIN) x the detector's box side, centred on the box, so that a
# photo's face is cropped like the training faces. Measured on real faces: 700 FER2013
# crops (50 per class from each of its train and test splits, seeded), each enlarged to
# 150 px and pasted at a random place into a 450 px frame of its own edge pixels, then
# given to detect_faces: 498 found (71 %: sad 59 %, happy 82 %), crop/box median
# 1.034 (quartiles 0.98-1.12), the box centred on the crop (offset < 0.01 box side);
# enlarged to 100 and 200 px instead, the median was 1.03 and 1.05. Synthetic faces
# measured the same way gave 1.35 (quartiles 1.26-1.44, 117 of 140 found): the generator
# draws looser crops than real ones, and the real figure is the one kept. RAF-DB's aligned
# crops were not measured (no copy at hand).
FACE_MARGIN = 0.03
# Detect on a copy whose long side is at most this: the cascade's time grows with pixels.
DETECT_SIDE = 640
# A face whose square would cover this share of the short side already fills the frame: the
# image is a face crop, used whole (its centre square) rather than padded around the box.
FILLS_FRAME = 0.9
# shipped in opencv-python-headless 4.x (cv2.data)
CASCADE = "haarcascade_frontalface_default.xml"
# The cascade's window: it finds no face smaller. A photo whose short side is shorter holds no
# face the model could read (FER2013's crops, the smallest training faces, are 48 px).
MIN_FACE_SIDE = 24


def load_photo(path):
    """Any image Pillow opens -> uint8 (H, W) gray or (H, W, 3) RGB at full resolution, as a
    viewer shows it (photo_array)."""
    from PIL import Image, UnidentifiedImageError
    if not str(path).strip():
        raise DataError("an empty image path: give the name of an image file")
    try:
        with Image.open(path) as image:
            return photo_array(image)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    # a few bytes that decode to gigabytes
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: too many pixels to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path} is not an image Pillow can read ({err})") from None


def photo_array(image):
    """An open PIL image -> uint8 (H, W) gray or (H, W, 3) RGB: EXIF orientation applied, 16-bit
    gray scaled to 8 bits (not clipped), palette and alpha images composited onto white."""
    from PIL import Image, ImageOps
    # phones store pixels sideways plus an EXIF turn
    image = ImageOps.exif_transpose(image)
    # 16-bit gray (I;16, I;16B, I): keep its high byte
    if image.mode.startswith("I"):
        return (np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        # Transparent pixels hold arbitrary (often black) color: show them as white paper.
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("L" if image.mode in ("1", "L", "F") else "RGB")
    # a writable copy: torch.from_numpy wants one
    return np.array(image, dtype=np.uint8)


def as_photo(image):
    """A path, an open PIL image or a numpy uint8 array (H, W) gray or (H, W, 3) RGB -> the
    uint8 photo load_photo gives: what the recognizer accepts as a face photo, if it is large
    enough to hold one."""
    from PIL import Image
    is_path = isinstance(image, (str, os.PathLike))
    if is_path:
        photo = load_photo(image)
    elif isinstance(image, Image.Image):
        try:
            photo = photo_array(image)
        # a lazily decoded file that turns out truncated or corrupt
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"the PIL image cannot be decoded ({err})") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise DataError(f"an image array must be uint8 (H, W) gray or (H, W, 3) RGB, got {image.dtype} "
                            f"{image.shape}: convert it, e.g. with np.asarray(pil_image.convert('RGB'))")
        if min(image.shape[:2]) == 0:
            raise DataError(f"an empty image array {image.shape}")
        photo = image
    else:
        raise DataError(f"an image is a path, a PIL image or a numpy uint8 array, not a {type(image).__name__}")
    height, width = photo.shape[:2]
    if min(height, width) < MIN_FACE_SIDE:
        raise DataError(f"{image if is_path else 'the image'} is too small to hold a face ({width}x{height} "
                        f"pixels; a face needs {MIN_FACE_SIDE} or more each way)")
    return photo


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


@functools.cache
def face_cascade():
    """OpenCV's frontal-face cascade, read once per process: reading its XML takes about 8 ms, a
    quarter of a detection on a 320 px photo, and a batch reads many photos."""
    import cv2
    return cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, CASCADE))


def detect_faces(gray):
    """Frontal faces in a uint8 (H, W) image -> [(x, y, w, h), ...] in its pixels, largest first.
    OpenCV is imported here: training and evaluation never need it."""
    import cv2
    # Shrink by a whole factor k (the mean of each k x k block): OpenCV's fast path, 4 ms for
    # 12 megapixels where a fractional INTER_AREA takes 50. The < k dropped edge pixels never matter.
    k = -(-max(gray.shape) // DETECT_SIDE)
    height = gray.shape[0] // k
    width = gray.shape[1] // k
    # a thin photo's short side shrinks below the window, even to 0 pixels (which OpenCV refuses)
    if min(height, width) < MIN_FACE_SIDE:
        return []
    small = cv2.resize(gray[:height * k, :width * k], (width, height), interpolation=cv2.INTER_AREA)
    # minSize: the cascade's own window. minNeighbors 8, not the usual 5: with 5, two copies of
    # the test photo side by side also gave two boxes on the space suit; 8 still finds 117 of the 120
    # synthetic faces that 5 finds (the synthetic FACE_MARGIN measurement).
    found = face_cascade().detectMultiScale(small, scaleFactor=1.1, minNeighbors=8,
                                            minSize=(MIN_FACE_SIDE, MIN_FACE_SIDE))
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
    # pads only the small crop, never the whole photo
    return resize_square(np.pad(inside, pad, mode="edge"), size)


def face_crops(gray, size, detect=True):
    """uint8 (H, W) -> the faces' boxes (x, y, w, h) largest first, the crop square (x, y, side)
    of each, and the crops uint8 (N, size, size). No face found, or detect False: no boxes, and
    the centre square alone."""
    boxes = detect_faces(gray) if detect else []
    squares = [face_square(box, gray.shape) for box in boxes] or [centre_square(gray.shape)]
    return boxes, squares, np.stack([crop_square(gray, square, size) for square in squares])

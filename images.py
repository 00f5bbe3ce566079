"""Face images: reading them, and finding and cropping the faces in photos.

    from images import read_image, load_photo, as_photo, to_gray, detect_faces, face_square, crop_square
    face = read_image("face.png", 75)           # uint8 (75, 75): how training images enter
    photo = load_photo("IMG_0042.jpg")           # uint8 (H, W[, 3]), upright, full resolution
    photo = as_photo(pil_image_or_array)          # the same from a PIL image or a uint8 array
    gray = to_gray(photo)                         # uint8 (H, W)
    boxes = detect_faces(gray)                    # [(x, y, w, h), ...], largest first
    crop = crop_square(gray, face_square(boxes[0], gray.shape), 75)  # cropped like the training faces
    boxes, squares, crops = face_crops(gray, 75)  # every face at once, the centre square if none
    lines = read_subtitles("talk.srt")            # [Line(start, end, text)], SRT or WebVTT
    video = open_video("talk.mp4", fps=5)         # a file, or a camera index: open_video(0, fps=5)
    for at, index, frame in video_frames(video):   # seconds, frame index, uint8 (H, W, 3) RGB
        ids = tracker.ids(detect_faces(to_gray(frame)))  # tracker = FaceTracker(): one id per face

prepare_data.py and the recognizer (recognizer.py, behind demo.py and evaluate.py --pairs)
both read images here, so a photo and a training image are decoded the same way. The
training faces are tight, aligned crops; a photo's face is cropped to match them before the
model sees it. What happens to a face after that (preprocessing, the trunk) belongs to the
model: models.ImageEncoder.
"""
import functools
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import DataError, one_line

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


# ---- video: frames sampled from a file or a camera, subtitles, faces followed over time ----

@dataclass
class Line:
    """One subtitle line: shown from `start` to `end` seconds."""
    start: float
    end: float
    text: str


# SRT writes 00:01:02,500; WebVTT 00:01:02.500 or 01:02.500 (hours optional)
TIMESTAMP = r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{3})"
CUE_TIMES = re.compile(rf"^\s*{TIMESTAMP}\s*-->\s*{TIMESTAMP}(?:\s.*)?$")


def read_subtitles(path):
    """An SRT or WebVTT file -> [Line] sorted by start. Markup (<i>, {\\an8}) is dropped; a cue's
    lines are joined by spaces. A broken timing line is a DataError that names its line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such subtitle file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path} cannot be read as UTF-8 subtitles ({one_line(err)})") from None
    lines = []
    cue = None  # (start, end, [text lines]) of the cue being read
    for number, row in enumerate(text.splitlines(), start=1):
        if "-->" in row:
            times = CUE_TIMES.match(row)
            if not times:
                raise DataError(f"{path}, line {number}: a broken timestamp {row.strip()!r} "
                                "(expected 00:00:01,000 --> 00:00:02,500)")
            groups = times.groups()
            start, end = seconds(groups[:4]), seconds(groups[4:])
            if end < start:
                raise DataError(f"{path}, line {number}: the line ends before it starts ({row.strip()!r})")
            cue = (start, end, [])
            lines.append(cue)
        elif not row.strip():
            cue = None
        elif cue is not None:
            cue[2].append(re.sub(r"<[^>]*>|\{[^}]*\}", "", row).strip())
    if not lines:
        raise DataError(f"{path} holds no subtitle lines (no '-->' timings): give an SRT or WebVTT file")
    return sorted((Line(start, end, " ".join(t for t in words if t)) for start, end, words in lines),
                  key=lambda line: line.start)


def seconds(parts):
    """(hours or None, minutes, seconds, milliseconds) strings -> seconds."""
    hours, minutes, secs, millis = parts
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(secs) + int(millis) / 1000


def line_at(lines, at):
    """The Line shown at `at` seconds, or None (the latest to start, where lines overlap)."""
    shown = [line for line in lines if line.start <= at < line.end]
    return shown[-1] if shown else None


@dataclass
class Video:
    """An open video file or camera, and the rate at which it is sampled."""
    capture: object    # cv2.VideoCapture
    name: str          # the file, or "camera N"
    camera: bool
    rate: float        # frames per second of the file (0 where a camera does not say)
    frames: int        # frames in the file (0 for a camera)
    fps: float         # sampled frames per second
    warnings: list

    @property
    def duration(self):
        return self.frames / self.rate if self.rate and self.frames else None


def open_video(source, fps):
    """A path (any file OpenCV reads) or a camera index -> Video, sampled at `fps` frames per second
    (at most the file's own rate: above it, the file's rate with a warning)."""
    import cv2  # deferred: start-up time of every script that imports this module
    if not fps > 0:
        raise DataError(f"--fps must be above 0, not {fps}")
    camera = isinstance(source, int)
    name = f"camera {source}" if camera else str(source)
    if not camera and not Path(source).is_file():
        raise DataError(f"{source}: no such video file")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        if camera:
            raise DataError(f"camera {source} does not open: check its index (0 is the first camera) "
                            "and that no other program holds it")
        raise DataError(f"{source} is not a video OpenCV can read")
    rate = capture.get(cv2.CAP_PROP_FPS) or 0.0
    frames = 0 if camera else int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    warnings = []
    if rate and fps > rate:
        warnings.append(f"--fps {fps:g} is above the video's own rate: sampling every frame ({rate:g} per second)")
        fps = rate
    return Video(capture, name, camera, rate, frames, fps, warnings)


def video_frames(video, after=None):
    """Sampled frames of `video` after `after` seconds (None: from the start) -> (time in seconds,
    frame index, uint8 RGB (H, W, 3)), one every 1/fps seconds. A file's time is its frame index
    over its rate, so a rerun samples the same frames; a camera's time is the time since its first
    frame, so a slow model makes it skip frames rather than fall behind."""
    import cv2  # deferred, as in open_video
    step = 1 / video.fps
    # the time of the next sample; a hair under it still counts (index / rate rounds)
    due = 0.0 if after is None else next_sample(after, step)
    index = -1
    first = None
    try:
        while True:
            # grab() without retrieve(): a frame that is not sampled is never converted
            if not video.capture.grab():
                if index < 0 and not video.camera:
                    raise DataError(f"{video.name} is not a video OpenCV can read (no frame decodes)")
                return
            index += 1
            now = time.monotonic()
            first = now if first is None else first
            at = now - first if video.camera or not video.rate else index / video.rate
            if at + 1e-6 < due:
                continue
            ok, frame = video.capture.retrieve()
            if not ok:
                return
            due = next_sample(at, step)
            yield at, index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        video.capture.release()


def next_sample(at, step):
    """The first multiple of `step` after `at` seconds."""
    return (math.floor((at + 1e-6) / step) + 1) * step


def overlap(a, b):
    """Intersection over union of two boxes (x, y, w, h)."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


class FaceTracker:
    """Keeps an id on each face from frame to frame: a box takes the id of the box it overlaps most
    (intersection over union at least MIN_OVERLAP) among the faces seen in the last MISSED_FRAMES
    sampled frames, so that a face the detector misses for a frame keeps its id. A new id only for a
    face that was not there before."""
    MIN_OVERLAP = 0.3
    MISSED_FRAMES = 5

    def __init__(self):
        self.last_seen = {}  # id -> (box, frames since it was seen)
        self.next_id = 1

    def ids(self, boxes):
        """Boxes (x, y, w, h) of one frame -> their face ids, in the same order."""
        pairs = sorted(((overlap(box, seen), i, face) for i, box in enumerate(boxes)
                        for face, (seen, _) in self.last_seen.items()), reverse=True)
        ids = [None] * len(boxes)
        taken = set()
        for score, i, face in pairs:
            if score >= self.MIN_OVERLAP and ids[i] is None and face not in taken:
                ids[i] = face
                taken.add(face)
        for i, face in enumerate(ids):
            if face is None:
                ids[i] = self.next_id
                self.next_id += 1
        self.remember(ids, boxes)
        return ids

    def remember(self, ids, boxes):
        """Faces `ids` seen at `boxes` in the next frame (also how a resumed run replays its rows)."""
        self.last_seen = {face: (box, missed + 1) for face, (box, missed) in self.last_seen.items()
                          if missed + 1 < self.MISSED_FRAMES}
        self.last_seen.update({face: (tuple(box), 0) for face, box in zip(ids, boxes)})
        self.next_id = max([self.next_id, *(face + 1 for face in ids)])

"""Reading images, and finding the faces in photos.

    from images import read_image
    face = read_image("face.png", 75)          # uint8 (75, 75), the one way images enter

prepare_data.py and demo.py both read images here, so a photo and a training image
are decoded the same way.
"""
import numpy as np

from data import DataError


def read_image(path, size):
    """Any image Pillow opens (color or gray, PNG/JPEG/WebP, any size) -> uint8 [size, size].
    The one way images enter the project: prepare_data.py and demo.py both use it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image = image.convert("L")  # stored modes vary (L, RGB, P): always one channel
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path} is not an image Pillow can read ({err})") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy wants one

"""Read any image Pillow can open into the uint8 (3, 32, 32) layout of CIFAR-10.

Steps: the first frame of an animation; EXIF orientation applied; 16-bit and
float images scaled to 8 bits; transparency composited onto white; any mode
(grayscale, palette, CMYK, ...) converted to RGB; the largest centred square
cropped (so the picture is not squashed) and resized to 32x32 with Pillow's
antialiasing Lanczos filter.

Only regular files are read (a FIFO would block), and an image of more than
``Image.MAX_IMAGE_PIXELS`` pixels (Pillow's decompression-bomb limit,
89,478,485 by default, e.g. 9459 x 9459) is refused before it is decoded:
such a file can be a few bytes that decode to gigabytes.
"""

from __future__ import annotations

import struct
import warnings

import numpy
from PIL import Image, ImageOps, UnidentifiedImageError

from minicnn.errors import MinicnnError
from minicnn.files import display, open_regular

SIZE = 32


class ImageError(MinicnnError):
    """An input image could not be read."""


def _full_scale(image: Image.Image, values: numpy.ndarray) -> float:
    """The value that means "white": 65535 for 16-bit modes, else the smallest of
    1, 255 and 65535 that covers the data (float images may be 0..1 or 0..255)."""
    if image.mode.startswith("I;16"):
        return 65535.0
    peak = float(values.max()) if values.size else 0.0
    return next((top for top in (1.0, 255.0, 65535.0) if peak <= top), peak)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = numpy.asarray(image, dtype=numpy.float64)
        if not numpy.isfinite(values).all():
            raise ValueError("it has NaN or infinite pixel values")
        scaled = values / _full_scale(image, values) * 255.0
        image = Image.fromarray(numpy.clip(scaled, 0, 255).round().astype(numpy.uint8))
    if image.mode in ("P", "PA", "LA", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(path) -> numpy.ndarray:
    """uint8 array (3, 32, 32) for the image at ``path``; raises ImageError."""
    name = display(path)
    limit = Image.MAX_IMAGE_PIXELS
    with open_regular(path, ImageError, "image") as f:
        try:
            with warnings.catch_warnings():       # the limit is checked below, as an error
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f)             # reads the header only
            with image:
                if limit and image.width * image.height > limit:
                    raise Image.DecompressionBombError
                image.seek(0)                     # first frame of an animation
                image = ImageOps.exif_transpose(image)
                image.load()
                rgb = _to_rgb(image)
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: more than {limit:,} pixels (Pillow's decompression-bomb "
                             "limit, Image.MAX_IMAGE_PIXELS); refusing to decode it") from None
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image Pillow can read") from None
        except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError,
                KeyError, struct.error, ZeroDivisionError, MemoryError) as exc:
            raise ImageError(f"{name}: cannot read image ({exc})") from None
    square = ImageOps.fit(rgb, (SIZE, SIZE), method=Image.Resampling.LANCZOS)
    return numpy.asarray(square, dtype=numpy.uint8).transpose(2, 0, 1).copy()


def load_images(paths) -> tuple[list, numpy.ndarray, list]:
    """Read many images: (paths read, uint8 (N, 3, 32, 32), [ImageError for the others])."""
    good, arrays, errors = [], [], []
    for path in paths:
        try:
            arrays.append(load_image(path))
            good.append(str(path))
        except ImageError as exc:
            errors.append(exc)
    stacked = numpy.stack(arrays) if arrays else numpy.zeros((0, 3, SIZE, SIZE), numpy.uint8)
    return good, stacked, errors

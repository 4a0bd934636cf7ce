"""Image files in, RGB images out: which files are images, whether they can be read, and 8-bit RGB conversion."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps

from .errors import DataError

# Formats PIL registers an extension for but cannot read pixels from on its own: save-only (PDF, PALM), stubs that
# need an external handler (BUFR, GRIB, HDF5), Ghostscript (EPS), Windows (WMF), metadata (IPTC), video (MPEG).
_NOT_RASTER_FORMATS = frozenset({"BUFR", "EPS", "GRIB", "HDF5", "IPTC", "MPEG", "PALM", "PDF", "WMF"})
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_image(image: Any) -> Any:
    """``image`` (a ``PIL.Image`` of any mode) as an 8-bit RGB ``PIL.Image``, always a new image.

    ``convert("RGB")`` clips ``I;16``/``I``/``F`` pixels to 255, so a 16-bit photo would become almost white. Here
    16-bit values (``I;16``, and ``I`` images whose values fit in 16 bits, as PIL opens some 16-bit files) are divided
    by 257 (65535 -> 255); floats in ``[0, 1]`` are multiplied by 255; other ``I``/``F`` images are scaled from their
    own minimum..maximum. Every other mode (``L``, ``RGBA``, ``CMYK``, ``P``, ...) goes through ``convert("RGB")``.

    >>> from PIL import Image
    >>> rgb_image(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0))
    (255, 255, 255)
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = PIL.Image.fromarray(_eight_bit(np.asarray(image), image.mode))
    return image.convert("RGB")  # a copy even in RGB: a file's image is closed with the file


def _eight_bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """``uint8`` pixels from the values of a single-channel image of ``mode`` (``I;16``, ``I`` or ``F``)."""
    pixels = pixels.astype(np.float64)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES and low >= 0 and high <= 65535:
        scaled = pixels / 257
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = pixels * 255
    else:
        scaled = (pixels - low) * (255 / (high - low)) if high > low else np.zeros_like(pixels)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the raster formats PIL can open: the files a folder of images
    is searched for."""
    PIL.Image.init()
    return frozenset(
        ext.lower() for ext, fmt in PIL.Image.registered_extensions().items() if fmt not in _NOT_RASTER_FORMATS
    )


def image_problem(source: str | os.PathLike | bytes, check: str = "decode") -> str | None:
    """Why the image file ``source`` (a path, or the file's bytes) cannot be used, or ``None`` if it can.

    Args:
        source: A path or the bytes of an image file.
        check: ``"decode"`` reads every byte of the image (a truncated or corrupt file is found; JPEGs are decoded
            at 1/8 scale with PIL's draft mode, which still reads the whole file); ``"header"`` only checks the file
            header (faster, misses truncation).
    """
    error = _open_error(source, check)
    return None if error is None else f"{type(error).__name__}: {error}"


def _open_error(source: str | os.PathLike | bytes, check: str = "decode") -> Exception | None:
    """The error PIL raises when it reads the image file ``source`` (see :func:`image_problem`), or ``None``."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        return FileNotFoundError("no such file")
    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if check == "header":
                image.verify()
            else:
                image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte of the file
                image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return error
    return None


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file as an RGB ``PIL.Image`` (see :func:`rgb_image` for the conversion), turned upright as its
    EXIF orientation says, as ``datasets`` decodes images for training: a photo taken in portrait is seen in portrait.

    Raises:
        DataError: the file does not exist or is not a readable image.
    """
    check_image(path)
    with PIL.Image.open(path) as image:
        if image.getexif().get(PIL.ExifTags.Base.Orientation) is not None:
            return rgb_image(PIL.ImageOps.exif_transpose(image))
        return rgb_image(image)


def check_image(path: str | os.PathLike) -> None:
    """Read all of an image file without keeping its pixels (see :func:`image_problem`), so a truncated or corrupt
    file is found before any work starts.

    Raises:
        DataError: the file does not exist or is not a readable image.
    """
    error = _open_error(path)
    if isinstance(error, FileNotFoundError):
        raise DataError(f"Image file '{path}' does not exist.")
    if isinstance(error, PIL.UnidentifiedImageError):
        raise DataError(f"Cannot read image '{path}': not an image file that PIL can decode.") from error
    if error is not None:
        raise DataError(f"Cannot read image '{path}': {error}.") from error

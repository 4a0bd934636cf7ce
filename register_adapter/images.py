"""Images in, pixel values out, and one forward pass of a vision tower: the input side of the diagnostics.

Images may be pixel values, PIL images, uint8 arrays or file paths; files are read one batch at a time so a folder of
any size fits in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import find_vision_tower
from .errors import DataError, InvalidConfigError, UnsupportedModelError


def load_image(path: str | Path, *, decode: bool = True) -> Any:
    """Open an image file as an RGB ``PIL.Image``.

    Args:
        path: The image file.
        decode: Decode the pixels; with ``False`` only the header is read (a fast check) and ``None`` returned.

    Raises:
        DataError: the file does not exist or is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image file '{path}' does not exist.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB") if decode else None
    except UnidentifiedImageError as error:
        raise DataError(f"Cannot read image '{path}': not an image file that PIL can decode.") from error
    except (OSError, ValueError) as error:  # truncated or corrupt image data
        raise DataError(f"Cannot read image '{path}': {error}.") from error


def default_processor(model: nn.Module) -> Any:
    """The processor used when none is given: resize to the model's ``image_size``, scale to [0, 1] and normalise
    with mean = std = 0.5 (``ViTImageProcessor``'s defaults)."""
    from transformers import ViTImageProcessorPil

    size = find_vision_tower(model).config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return ViTImageProcessorPil(size={"height": height, "width": width})


def _image_list(images: Any) -> list[Any]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):
        return [images]
    return list(images)


def as_pixel_values(images: Any, model: nn.Module, processor: Any = None) -> torch.Tensor:
    """Turn pixel values or images into pixel values (B, 3, H, W).

    Args:
        images: A tensor (B, 3, H, W) or (3, H, W), used as is; or one or a list of images: ``PIL.Image``, uint8
            arrays (H, W, 3), or paths to image files.
        model: The model the pixel values are for (gives the default input size).
        processor: A Hugging Face image processor; default :func:`default_processor`.

    Raises:
        DataError: no images, pixel values of the wrong shape, or an image file that cannot be read.
    """
    if isinstance(images, torch.Tensor):
        pixel_values = images if images.ndim == 4 else images.unsqueeze(0)  # (B, 3, H, W)
    else:
        loaded = [load_image(image) if isinstance(image, (str, Path)) else image for image in _image_list(images)]
        if not loaded:
            raise DataError("No images given.")
        processor = processor if processor is not None else default_processor(model)
        pixel_values = processor(images=loaded, return_tensors="pt")["pixel_values"]
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise DataError(f"Expected pixel values of shape (batch, 3, height, width); got {tuple(pixel_values.shape)}.")
    if pixel_values.shape[0] == 0:
        raise DataError("No images given.")
    return pixel_values


def batches(pixel_values: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of at most ``batch_size`` images."""
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be at least 1; got {batch_size}.")
    yield from pixel_values.split(batch_size)


def pixel_batches(
    images: Any, model: nn.Module, processor: Any = None, batch_size: int = 8
) -> tuple[int, Iterator[torch.Tensor]]:
    """The number of images and an iterator over their pixel values, (b, 3, H, W) per batch. Image files are read
    and preprocessed one batch at a time, so a folder of any size fits in memory."""
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be at least 1; got {batch_size}.")
    tower = find_vision_tower(model)
    if not tower.spec.image_input:
        raise UnsupportedModelError(
            f"{type(tower.module).__name__} takes pre-patchified pixel sequences, not images on a patch grid: "
            "artifact maps, attention maps and object discovery need a (B, 3, H, W) image model."
        )
    if isinstance(images, torch.Tensor):
        pixel_values = as_pixel_values(images, model)
        return len(pixel_values), batches(pixel_values, batch_size)
    items = _image_list(images)
    if not items:
        raise DataError("No images given.")
    chunks = (items[start : start + batch_size] for start in range(0, len(items), batch_size))
    return len(items), (as_pixel_values(chunk, model, processor) for chunk in chunks)


def patch_grid(size: Sequence[int], patch_size: int) -> tuple[int, int]:
    """``(rows, columns)`` of the patch grid of images of size ``(..., H, W)``, e.g. ``pixel_values.shape``.

    >>> patch_grid((8, 3, 224, 160), 16)
    (14, 10)
    """
    height, width = size[-2:]
    return height // patch_size, width // patch_size


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then restore its training flag."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def run_tower(model: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    """One forward pass of the vision tower of ``model`` (the text tower of CLIP is not needed) on the tower's device
    and dtype. Registers of an active adapter are inserted as in a forward pass of the whole model."""
    tower = find_vision_tower(model)
    reference = next(p for p in tower.module.parameters() if p.is_floating_point())
    return tower.module(pixel_values=pixel_values.to(reference.device, reference.dtype), **kwargs)

"""Images in, pixel values out, one batch at a time: a folder of any size fits in memory.

Images may be pixel values, PIL images, uint8 arrays, file paths, folders or a ``datasets`` dataset with an image
column (see :func:`image_sequence`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .architectures import VisionTower
from .errors import DataError, InvalidConfigError, UnsupportedModelError
from .forward import native_size
from .images import load_image, rgb_image
from .sources import IMAGE_COLUMN


def default_processor(tower: VisionTower) -> Any:
    """The processor used when none is given: resize to the tower's ``image_size``, scale to [0, 1] and normalise
    with mean = std = 0.5 (``ViTImageProcessor``'s defaults)."""
    from transformers import ViTImageProcessorPil

    height, width = native_size(tower)
    return ViTImageProcessorPil(size={"height": height, "width": width})


class _DatasetImages(Sequence):
    """The images of a ``datasets`` dataset, decoded only when indexed (a slice decodes that slice)."""

    def __init__(self, dataset: Any, column: str) -> None:
        if column not in dataset.column_names:
            raise DataError(
                f"The dataset has no image column {column!r}. Available columns: {', '.join(dataset.column_names)}."
            )
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.dataset[index][self.column]
        return self.dataset[int(index)][self.column]


class _IterableDatasetImages:
    """The images of a ``datasets.IterableDataset``, read one row at a time each time it is iterated."""

    def __init__(self, dataset: Any, column: str) -> None:
        if dataset.column_names is not None and column not in dataset.column_names:
            raise DataError(
                f"The dataset has no image column {column!r}. Available columns: {', '.join(dataset.column_names)}."
            )
        self.dataset, self.column = dataset, column

    def __iter__(self) -> Iterator[Any]:
        return (row[self.column] for row in self.dataset)


def reiterable_images(images: Any, image_column: str = IMAGE_COLUMN) -> Iterable[Any] | None:
    """``images`` as an iterable to read one image at a time, when it is a collection without indexing that starts
    over each time it is iterated (a ``datasets.IterableDataset``, an object with ``__iter__``); ``None`` for
    sequences, single images, tensors and one-shot iterators (generators)."""
    if isinstance(images, (str, Path, np.ndarray, torch.Tensor, Sequence, Iterator)) or hasattr(images, "convert"):
        return None
    if not isinstance(images, Iterable) or (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
        return None  # a datasets.Dataset is indexed, see image_sequence
    if hasattr(images, "column_names") and hasattr(images, "features"):
        return _IterableDatasetImages(images, image_column)
    return images


def image_sequence(images: Any, image_column: str = IMAGE_COLUMN) -> Sequence[Any]:
    """``images`` as a sequence of single images, read lazily where that saves memory.

    Args:
        images: One image or a list of them (``PIL.Image``, uint8 arrays, file paths, folders, searched recursively),
            a (n, H, W[, 3]) uint8 array, or a ``datasets.Dataset`` whose ``image_column`` holds the images.
        image_column: The image column of a dataset.

    Raises:
        DataError: a path that does not exist, a folder without images, a dataset without that column.
    """
    from .sources import find_image_files

    if hasattr(images, "column_names") and hasattr(images, "features"):  # a datasets.Dataset
        return _DatasetImages(images, image_column)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):
        images = [images]
    items = list(images)
    if any(isinstance(item, (str, Path)) and Path(item).is_dir() for item in items):
        items = [
            found
            for item in items
            for found in (
                find_image_files([item]) if isinstance(item, (str, Path)) and Path(item).is_dir() else [item]
            )
        ]
    return items


def _prepare(image: Any, index: int) -> Any:
    """One image as the processor gets it: files read, PIL images in RGB, grayscale arrays with three channels."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if hasattr(image, "convert") and hasattr(image, "mode"):
        return rgb_image(image)
    if isinstance(image, torch.Tensor):
        return image  # channels first, as the processors take tensors
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return np.stack([image] * 3, axis=-1)  # (H, W, 3)
        if image.ndim == 3 and image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if image.ndim == 3 and image.shape[-1] == 3:
            return image
        raise DataError(
            f"Image {index} is an array of shape {image.shape}; expected (height, width) for grayscale or "
            "(height, width, 3) for RGB. Convert it first, e.g. array[..., :3] to drop an alpha channel or "
            "array.transpose(1, 2, 0) for a channels-first array."
        )
    raise DataError(
        f"Image {index} is a {type(image).__name__}; expected a PIL image, a uint8 array (height, width[, 3]), a "
        "file path, or pixel values (batch, 3, height, width) as one tensor."
    )


def different_sizes_error(index: int, size: Sequence[int], first_index: int, first: Sequence[int]) -> DataError:
    """The error for images that reach the model at different sizes (one batch, one patch grid)."""
    return DataError(
        f"Images must all have one size after preprocessing: image {index} is {size[0]}x{size[1]} pixels (height x "
        f"width), image {first_index} is {first[0]}x{first[1]}. Resize or crop them to one size first, or pass a "
        f"processor with a fixed output size, e.g. size={{'height': {first[0]}, 'width': {first[1]}}} or "
        "do_center_crop=True."
    )


def as_pixel_values(images: Any, tower: VisionTower, processor: Any = None, *, start: int = 0) -> torch.Tensor:
    """Turn pixel values or images into pixel values (B, 3, H, W).

    Args:
        images: A tensor (B, 3, H, W) or (3, H, W), used as is; or one or a list of images: ``PIL.Image`` of any mode
            (converted with :func:`rgb_image`), uint8 arrays (H, W, 3) or (H, W), or paths to image files.
        tower: The vision tower the pixel values are for (gives the default input size).
        processor: A Hugging Face image processor; default :func:`default_processor`.
        start: Index of the first image, for error messages.

    Raises:
        DataError: no images, pixel values of the wrong shape, an image file that cannot be read, an array that is
            not an image, or images that differ in size after preprocessing.
    """
    if isinstance(images, torch.Tensor):
        return _checked(images if images.ndim == 4 else images.unsqueeze(0))  # (B, 3, H, W)
    loaded = [_prepare(image, start + i) for i, image in enumerate(image_sequence(images))]
    return _process(loaded, tower, processor, start)


def _process(loaded: list[Any], tower: VisionTower, processor: Any, start: int) -> torch.Tensor:
    """Pixel values (B, 3, H, W) of prepared images (see :func:`_prepare`)."""
    if not loaded:
        raise DataError("No images given.")
    processor = processor if processor is not None else default_processor(tower)
    # Without return_tensors, so that images of different sizes get a clear error rather than numpy's.
    processed = [torch.as_tensor(np.asarray(v)) for v in processor(images=loaded)["pixel_values"]]  # (3, H, W) each
    for i, values in enumerate(processed):
        if values.shape[-2:] != processed[0].shape[-2:]:
            raise different_sizes_error(start + i, values.shape[-2:], start, processed[0].shape[-2:])
    return _checked(torch.stack(processed))


def _checked(pixel_values: torch.Tensor) -> torch.Tensor:
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


def sized_pixel_batches(
    images: Any, tower: VisionTower, processor: Any = None, batch_size: int = 8
) -> tuple[int | None, Iterator[tuple[torch.Tensor, list[tuple[int, int]] | None]]]:
    """Like :func:`pixel_batches`, with the ``(height, width)`` of every image before preprocessing next to each
    batch (``None`` when ``images`` are pixel values)."""
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be at least 1; got {batch_size}.")
    if not tower.spec.image_input:
        raise UnsupportedModelError(
            f"{type(tower.module).__name__} takes pre-patchified pixel sequences, not images on a patch grid: "
            "artifact maps, attention maps and object discovery need a (B, 3, H, W) image model."
        )
    if isinstance(images, torch.Tensor):
        pixel_values = as_pixel_values(images, tower)
        return len(pixel_values), ((batch, None) for batch in batches(pixel_values, batch_size))
    lazy = reiterable_images(images)
    if lazy is not None:
        count = len(images) if hasattr(images, "__len__") else None
        return count, _stream(lazy, tower, processor, batch_size)
    items = image_sequence(images)
    if not items:
        raise DataError("No images given.")

    def generate() -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
        for start in range(0, len(items), batch_size):
            chunk = [_prepare(image, start + i) for i, image in enumerate(items[start : start + batch_size])]
            sizes = [_image_size(image) for image in chunk]
            yield _process(chunk, tower, processor, start), sizes

    return len(items), generate()


def _stream(
    images: Iterable[Any], tower: VisionTower, processor: Any, batch_size: int
) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Pixel values and sizes of ``images`` read one batch at a time, in one iteration over them."""
    chunk: list[Any] = []
    start = 0
    for image in images:
        chunk.append(_prepare(image, start + len(chunk)))
        if len(chunk) == batch_size:
            yield _process(chunk, tower, processor, start), [_image_size(image) for image in chunk]
            start, chunk = start + len(chunk), []
    if chunk or not start:
        yield _process(chunk, tower, processor, start), [_image_size(image) for image in chunk]


def pixel_batches(
    images: Any, tower: VisionTower, processor: Any = None, batch_size: int = 8
) -> tuple[int | None, Iterator[torch.Tensor]]:
    """The number of images (``None`` for an iterable without a length) and an iterator over their pixel values,
    (b, 3, H, W) per batch. Image files are read and preprocessed one batch at a time, so a folder of any size fits in
    memory; so are the images of an iterable that is not a sequence (see :func:`reiterable_images`)."""
    count, sized = sized_pixel_batches(images, tower, processor, batch_size)
    return count, (pixel_values for pixel_values, _ in sized)


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a prepared image: PIL (size is (W, H)), an (H, W, 3) array or a (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    width, height = image.size
    return int(height), int(width)

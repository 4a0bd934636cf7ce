"""Sizes and coordinates: patch grids, image-processor output sizes, and pixel-value coordinates mapped back to
the images they came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError, UnsupportedModelError


def size_field(size: Any, key: str) -> Any:
    """``size[key]`` of an image processor's ``size`` or ``crop_size`` (a dict or a ``SizeDict``); ``None`` if unset."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _resized_size(processor: Any, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """(height, width) of an image of ``image_size`` after the processor's resize, by the rules of the processors
    in ``transformers`` (``None`` for a rule not known here)."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    if not getattr(processor, "do_resize", True):
        return image_size
    size = getattr(processor, "size", None)
    field = {key: size_field(size, key) for key in ("height", "width", "shortest_edge", "longest_edge")}
    field.update(max_height=size_field(size, "max_height"), max_width=size_field(size, "max_width"))
    if field["shortest_edge"] and field["longest_edge"]:
        return tuple(get_size_with_aspect_ratio(image_size, field["shortest_edge"], field["longest_edge"]))
    if field["shortest_edge"]:
        dummy = np.broadcast_to(np.uint8(0), (3, *image_size))  # only its shape is read
        return tuple(
            get_resize_output_image_size(
                dummy, field["shortest_edge"], default_to_square=False, input_data_format="channels_first"
            )
        )
    if field["max_height"] and field["max_width"]:
        return tuple(get_image_size_for_max_height_width(image_size, field["max_height"], field["max_width"]))
    if field["height"] and field["width"]:
        return int(field["height"]), int(field["width"])
    return None


def output_size(processor: Any, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """(height, width) of the pixel values ``processor`` makes of an image of ``image_size`` (height, width): its
    centre crop, else its resize (``None`` for a resize rule not known here)."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    height, width = size_field(crop, "height"), size_field(crop, "width")
    if crop is not None and height and width:  # a crop larger than the resized image pads it
        return int(height), int(width)
    resized = _resized_size(processor, image_size)
    return None if resized is None else (int(resized[0]), int(resized[1]))


def fixed_output_size(processor: Any) -> tuple[int, int] | None:
    """The (height, width) of every image's pixel values when ``processor`` makes them all one size (a resize to a
    height and a width, or a centre crop); ``None`` when the size follows the image's."""
    tall, wide = output_size(processor, (997, 13)), output_size(processor, (13, 997))  # two very different images
    return tall if tall is not None and tall == wide else None


def input_to_image(
    processor: Any, image_size: tuple[int, int], input_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """How pixel-value coordinates map back to the image: ``(scale_y, scale_x, top, left)`` with
    ``image_y = (input_y + top) * scale_y`` (x likewise), undoing the processor's resize and centre crop.

    Args:
        processor: The image processor that made the pixel values.
        image_size: ``(height, width)`` of the image.
        input_size: ``(height, width)`` of its pixel values.

    Raises:
        UnsupportedModelError: the processor crops after a resize rule not known here, or its output does not have
            the size its settings give.
    """
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if crop is None:  # the whole image, resized (or not) to the input
        resized, top, left = input_size, 0.0, 0.0
    else:
        resized = _resized_size(processor, image_size)
        expected = (size_field(crop, "height"), size_field(crop, "width"))
        if resized is None or tuple(expected) != tuple(input_size):
            raise UnsupportedModelError(
                f"Cannot map coordinates back to the images: {type(processor).__name__} (size={processor.size}, "
                f"crop_size={crop}) gave {input_size[0]}x{input_size[1]} pixel values. Pass pixel values instead; "
                "boxes are then in their coordinates."
            )
        top, left = float((resized[0] - input_size[0]) // 2), float((resized[1] - input_size[1]) // 2)
    return image_size[0] / resized[0], image_size[1] / resized[1], top, left


def patch_grid(size: Sequence[int], patch_size: int) -> tuple[int, int]:
    """``(rows, columns)`` of the patch grid of images of size ``(..., H, W)``, e.g. ``pixel_values.shape``.

    >>> patch_grid((8, 3, 224, 160), 16)
    (14, 10)
    """
    height, width = size[-2:]
    return height // patch_size, width // patch_size


def target_size(image_processor: Any) -> tuple[int, int]:
    """``(height, width)`` of the pixel values that ``image_processor`` produces."""
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        size = image_processor.crop_size
    else:
        size = image_processor.size
    height, width, edge = (size_field(size, key) for key in ("height", "width", "shortest_edge"))
    if height and width:
        return int(height), int(width)
    if edge:
        return int(edge), int(edge)
    raise DataError(f"Cannot tell the output size of the image processor {type(image_processor).__name__}: {size}.")

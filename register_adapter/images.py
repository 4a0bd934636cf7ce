"""Images in, pixel values out, and one forward pass of a vision tower: the input side of the diagnostics.

Images may be pixel values, PIL images, uint8 arrays or file paths; files are read one batch at a time so a folder of
any size fits in memory.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import VisionTower, find_vision_tower
from .errors import DataError, InvalidConfigError, UnsupportedModelError

# Single-channel modes read as 16-bit values when scaling to 8 bits (``I`` is what PIL gives some 16-bit files; an
# ``I`` image with values beyond 16 bits is scaled by its own range instead).
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
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = Image.fromarray(_eight_bit(np.asarray(image), image.mode))
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


def _decoded(path: Path, *, check_only: bool) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"Image file '{path}' does not exist.")
    try:
        with Image.open(path) as image:
            if not check_only:
                return rgb_image(image)
            image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte of the file
            image.load()
            return None
    except UnidentifiedImageError as error:
        raise DataError(f"Cannot read image '{path}': not an image file that PIL can decode.") from error
    except (OSError, ValueError) as error:  # truncated or corrupt image data
        raise DataError(f"Cannot read image '{path}': {error}.") from error


def load_image(path: str | Path) -> Any:
    """Open an image file as an RGB ``PIL.Image`` (see :func:`rgb_image` for the conversion).

    Raises:
        DataError: the file does not exist or is not a readable image.
    """
    return _decoded(Path(path), check_only=False)


def check_image(path: str | Path) -> None:
    """Read all of an image file without keeping its pixels, so a truncated or corrupt file is found before any work
    starts; JPEGs are decoded at 1/8 scale (PIL's draft mode), which still reads every byte.

    Raises:
        DataError: the file does not exist or is not a readable image.
    """
    _decoded(Path(path), check_only=True)


def default_processor(model: nn.Module) -> Any:
    """The processor used when none is given: resize to the model's ``image_size``, scale to [0, 1] and normalise
    with mean = std = 0.5 (``ViTImageProcessor``'s defaults)."""
    from transformers import ViTImageProcessorPil

    height, width = _native_size(find_vision_tower(model))
    return ViTImageProcessorPil(size={"height": height, "width": width})


def _native_size(tower: VisionTower) -> tuple[int, int]:
    size = tower.config.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _image_list(images: Any) -> list[Any]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):
        return [images]
    return list(images)


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


def as_pixel_values(images: Any, model: nn.Module, processor: Any = None, *, start: int = 0) -> torch.Tensor:
    """Turn pixel values or images into pixel values (B, 3, H, W).

    Args:
        images: A tensor (B, 3, H, W) or (3, H, W), used as is; or one or a list of images: ``PIL.Image`` of any mode
            (converted with :func:`rgb_image`), uint8 arrays (H, W, 3) or (H, W), or paths to image files.
        model: The model the pixel values are for (gives the default input size).
        processor: A Hugging Face image processor; default :func:`default_processor`.
        start: Index of the first image, for error messages.

    Raises:
        DataError: no images, pixel values of the wrong shape, an image file that cannot be read, an array that is
            not an image, or images that differ in size after preprocessing.
    """
    if isinstance(images, torch.Tensor):
        return _checked(images if images.ndim == 4 else images.unsqueeze(0))  # (B, 3, H, W)
    loaded = [_prepare(image, start + i) for i, image in enumerate(_image_list(images))]
    return _process(loaded, model, processor, start)


def _process(loaded: list[Any], model: nn.Module, processor: Any, start: int) -> torch.Tensor:
    """Pixel values (B, 3, H, W) of prepared images (see :func:`_prepare`)."""
    if not loaded:
        raise DataError("No images given.")
    processor = processor if processor is not None else default_processor(model)
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
    images: Any, model: nn.Module, processor: Any = None, batch_size: int = 8
) -> tuple[int, Iterator[tuple[torch.Tensor, list[tuple[int, int]] | None]]]:
    """Like :func:`pixel_batches`, with the ``(height, width)`` of every image before preprocessing next to each
    batch (``None`` when ``images`` are pixel values)."""
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
        return len(pixel_values), ((batch, None) for batch in batches(pixel_values, batch_size))
    items = _image_list(images)
    if not items:
        raise DataError("No images given.")

    def generate() -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
        for start in range(0, len(items), batch_size):
            chunk = [_prepare(image, start + i) for i, image in enumerate(items[start : start + batch_size])]
            sizes = [_image_size(image) for image in chunk]
            yield _process(chunk, model, processor, start), sizes

    return len(items), generate()


def pixel_batches(
    images: Any, model: nn.Module, processor: Any = None, batch_size: int = 8
) -> tuple[int, Iterator[torch.Tensor]]:
    """The number of images and an iterator over their pixel values, (b, 3, H, W) per batch. Image files are read
    and preprocessed one batch at a time, so a folder of any size fits in memory."""
    count, sized = sized_pixel_batches(images, model, processor, batch_size)
    return count, (pixel_values for pixel_values, _ in sized)


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a prepared image: PIL (size is (W, H)), an (H, W, 3) array or a (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    width, height = image.size
    return int(height), int(width)


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
    and dtype. Registers of an active adapter are inserted as in a forward pass of the whole model.

    Pixel values of another size than the tower's ``image_size`` get ``interpolate_pos_encoding=True`` where its
    forward takes that argument (ViT, DeiT, CLIP, SigLIP, I-JEPA); DINOv2 and DINOv3 take any size as they are.

    Raises:
        DataError: the pixel values are not of the tower's size and the tower cannot take other sizes.
    """
    tower = find_vision_tower(model)
    reference = next(p for p in tower.module.parameters() if p.is_floating_point())
    native, size = _native_size(tower), tuple(pixel_values.shape[-2:])
    interpolates = "interpolate_pos_encoding" in inspect.signature(tower.module.forward).parameters
    if size != native and interpolates:
        kwargs["interpolate_pos_encoding"] = True
    try:
        return tower.module(pixel_values=pixel_values.to(reference.device, reference.dtype), **kwargs)
    except (ValueError, RuntimeError) as error:
        if size == native or interpolates or isinstance(error, torch.OutOfMemoryError):
            raise
        raise DataError(
            f"{type(tower.module).__name__} takes {native[0]}x{native[1]} pixel values (its image_size) and cannot "
            f"interpolate its position embeddings to the {size[0]}x{size[1]} given. Resize the images to "
            f"{native[0]}x{native[1]} (the default processor does) or pass a processor that does."
        ) from error

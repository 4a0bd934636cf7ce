"""The images a distillation trains on: pixel values on the patch grid, each image's random views, and the checks
that run before any compute."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch

from ...errors import DataError
from ...geometry import fixed_output_size, output_size, patch_grid, size_field, target_size
from ...images import rgb_image
from ...sources import IMAGE_COLUMN
from .teacher import crop_to_grid

SAMPLE_ID = "sample_id"
TARGETS = "targets"
PIXEL_DIGEST = "pixel_digest"


def view_rng(seed: int, sample_id: int, epoch: int | None = None) -> np.random.Generator:
    """The generator that draws the teacher's views of one image: a pure function of the seed, the image and (without
    a target cache, where views change every epoch) the epoch, so a resumed or multi-process run draws the same."""
    return np.random.default_rng([seed, sample_id] if epoch is None else [seed, epoch, sample_id])


def pixel_digest(pixel_values: torch.Tensor) -> str:
    """A hash of one image's pixel values (3, H, W): cached targets are checked against the pixels they belong to."""
    return hashlib.blake2b(pixel_values.float().cpu().numpy().tobytes(), digest_size=16).hexdigest()


class DistillationImages(torch.utils.data.Dataset):
    """Unlabelled images as ``{"pixel_values", "sample_id"}`` items, and with cached targets also ``"targets"``.

    Pixel values come from ``processor`` (the model's image processor), cropped to whole patches; every image must
    come out at ``size``.

    Args:
        images: A dataset with an ``image`` column (see :func:`register_adapter.sources.load_unlabelled_images`).
        processor: The image processor.
        patch_size: The model's patch size.
        size: ``(height, width)`` of the processor's output.
        targets: Cached targets, one row per image (see :mod:`register_adapter.methods.distillation.cache`).
    """

    def __init__(
        self,
        images: datasets.Dataset,
        processor: Any,
        patch_size: int,
        size: tuple[int, int],
        targets: datasets.Dataset | None = None,
    ) -> None:
        self.images, self.processor, self.patch_size, self.size = images, processor, patch_size, size
        self.targets = None if targets is None else targets.with_format("numpy")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def grid(self) -> tuple[int, int]:
        return patch_grid(self.size, self.patch_size)

    def with_targets(self, targets: datasets.Dataset) -> DistillationImages:
        """These images with their cached targets."""
        return DistillationImages(self.images, self.processor, self.patch_size, self.size, targets)

    def pixel_values(self, index: int) -> torch.Tensor:
        """The pixel values of image ``index``, (3, h * p, w * p)."""
        image = self.images[int(index)][IMAGE_COLUMN]
        image = image if image.mode == "RGB" else rgb_image(image)
        pixels = torch.as_tensor(np.asarray(self.processor(images=[image])["pixel_values"][0]))  # (3, H, W)
        if tuple(pixels.shape[-2:]) != tuple(self.size):
            height, width = pixels.shape[-2:]
            raise DataError(
                f"Image {index} is {height}x{width} pixels (height x width) after preprocessing, but distillation "
                f"needs every image at the processor's size, {self.size[0]}x{self.size[1]}. Pass a processor that "
                "crops or resizes to a fixed size (e.g. do_center_crop=True)."
            )
        return crop_to_grid(pixels, self.patch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.pixel_values(index)
        item = {"pixel_values": pixels, SAMPLE_ID: torch.tensor(int(index))}
        if self.targets is not None:
            row = self.targets[int(index)]
            if row[PIXEL_DIGEST] != pixel_digest(pixels):
                raise DataError(
                    f"The cached targets of image {index} were computed from other pixels: the image changed after the "
                    "target cache was made. Delete the cache folder (--target_cache_dir) to compute them again."
                )
            item[TARGETS] = torch.as_tensor(row[TARGETS]).float()  # (h, w, D)
        return item


def image_sizes(dataset: datasets.Dataset) -> list[tuple[int, int] | None]:
    """The (height, width) of every image, from its file header only; ``None`` where it cannot be opened (left to the
    readability check)."""
    raw = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    values = (value for batch in raw.iter(batch_size=256) for value in batch[IMAGE_COLUMN])  # bounded memory
    sizes = []
    for value in values:
        source = value["bytes"] if value.get("bytes") is not None else value.get("path")
        try:
            with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                sizes.append((image.height, image.width))
        except Exception:  # unreadable: reported by find_unreadable_images
            sizes.append(None)
    return sizes


def find_small_images(dataset: datasets.Dataset, grid: tuple[int, int]) -> dict[int, str]:
    """The rows whose image has fewer pixels than ``grid`` has patches along a side: less than one pixel per patch.

    Only file headers are read; images that cannot be opened are left to the readability check.
    """
    problems = {}
    for index, size in enumerate(image_sizes(dataset)):
        if size is not None and (size[0] < grid[0] or size[1] < grid[1]):
            problems[index] = (
                f"{size[1]}x{size[0]} pixels, smaller than the {grid[1]}x{grid[0]} patch grid: less than one pixel per "
                "patch"
            )
    return problems


def common_output_size(dataset: datasets.Dataset, processor: Any) -> tuple[int, int]:
    """The one (height, width) at which ``processor`` gives the pixel values of every image of ``dataset``.

    A processor that resizes to a height and a width, or centre-crops, gives one size whatever the images: nothing is
    read. Otherwise (no resize, or a resize that keeps the aspect ratio) the size follows each image's: the file
    headers are read, and the processor runs once per distinct image size whose resize rule is not known here.

    Raises:
        DataError: the images would come out at different sizes; the message lists them and how to fix it.
    """
    fixed = fixed_output_size(processor)
    if fixed is not None:
        return fixed
    outputs: Counter[tuple[int, int]] = Counter()
    by_input: dict[tuple[int, int], tuple[int, int]] = {}
    for index, size in enumerate(image_sizes(dataset)):
        if size is None:
            continue
        if size not in by_input:
            known = output_size(processor, size)
            if known is None:
                image = rgb_image(dataset[index][IMAGE_COLUMN])
                known = tuple(np.asarray(processor(images=[image])["pixel_values"][0]).shape[-2:])
            by_input[size] = known
        outputs[by_input[size]] += 1
    if len(outputs) > 1:
        listed = ", ".join(f"{h}x{w} ({n} images)" for (h, w), n in outputs.most_common(5))
        more = f" and {len(outputs) - 5} more" if len(outputs) > 5 else ""
        size = {key: size_field(processor.size, key) for key in ("height", "width", "shortest_edge", "longest_edge")}
        settings = (
            f"do_resize={getattr(processor, 'do_resize', None)}, size={ {k: v for k, v in size.items() if v} }, "
            f"do_center_crop={getattr(processor, 'do_center_crop', None)}"
        )
        raise DataError(
            f"The images would come out of {type(processor).__name__} ({settings}) at {len(outputs)} different sizes "
            f"(height x width): {listed}{more}. Distillation needs every image on "
            "one patch grid. Pass a processor that resizes to a fixed size (size={'height': H, 'width': W}) or "
            "centre-crops (do_center_crop=True with a crop_size)."
        )
    return next(iter(outputs)) if outputs else target_size(processor)

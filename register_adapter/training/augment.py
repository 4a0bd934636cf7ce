"""Training-time augmentation of images: an Inception-style random resized crop and a horizontal flip, in PIL.

The randomness is a pure function of ``(seed, epoch, sample_id)``, so an augmented sample does not depend on the order
in which batches are drawn: a run resumed from a checkpoint, a multi-process run and a single-process run see the same
pixels.
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch

from ..geometry import target_size
from ..images import rgb_image
from ..sources import IMAGE_COLUMN
from .data import LABEL_COLUMN, SAMPLE_ID_COLUMN


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random crop ``(left, top, right, bottom)`` covering ``scale`` of the area with aspect ratio in ``ratio``.

    The Inception-style crop (Szegedy et al., 2015) that ``RandomResizedCrop`` popularised: ten tries at a random
    area and log-uniform aspect ratio, then the largest central crop with a ratio inside ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageClassificationTransform:
    """Turn a batch of ``{"image", "label", "sample_id"}`` rows into ``{"pixel_values", "labels"}`` tensors.

    Use with ``Dataset.set_transform``. With ``train=True`` each image gets a random resized crop to the
    processor's output size and a random horizontal flip, drawn from a generator seeded by
    ``(seed, epoch, sample_id)``; set :attr:`epoch` at the start of every epoch (the trainer callback in
    :mod:`register_adapter.train` does). Without ``train`` the image processor alone resizes (and crops).

    Args:
        image_processor: the model's image processor (PIL backend).
        train: whether to augment.
        seed: seed of the augmentation.
        scale: range of the crop area, as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        flip_probability: probability of a horizontal flip.

    >>> from transformers import ViTImageProcessorPil
    >>> transform = ImageClassificationTransform(ViTImageProcessorPil(size={"height": 30, "width": 30}), train=True)
    >>> batch = {"image": [PIL.Image.new("RGB", (40, 50))], "label": [1], "sample_id": [0]}
    >>> transform(batch)["pixel_values"].shape
    torch.Size([1, 3, 30, 30])
    """

    def __init__(
        self,
        image_processor: Any,
        *,
        train: bool,
        seed: int = 42,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_probability: float = 0.5,
    ) -> None:
        self.image_processor = image_processor
        self.train = train
        self.seed = seed
        self.scale = scale
        self.ratio = ratio
        self.flip_probability = flip_probability
        self.epoch = 0
        self.size = target_size(image_processor)
        self.resample = getattr(image_processor, "resample", None)
        if self.resample is None:
            self.resample = PIL.Image.Resampling.BILINEAR

    def augment(self, image: PIL.Image.Image, sample_id: int) -> PIL.Image.Image:
        """The randomly cropped, resized and flipped ``image``; the same for the same sample id and epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, sample_id])
        box = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        height, width = self.size
        image = image.resize((width, height), resample=self.resample, box=box)
        if rng.uniform() < self.flip_probability:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        # Decoded RGB images are used as they are: a full-size copy per image and step would only cost time.
        images = [image if image.mode == "RGB" else rgb_image(image) for image in batch[IMAGE_COLUMN]]
        if self.train:
            images = [self.augment(image, int(i)) for image, i in zip(images, batch[SAMPLE_ID_COLUMN])]
            pixels = self.image_processor(images=images, do_resize=False, do_center_crop=False, return_tensors="pt")[
                "pixel_values"
            ]
        else:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch[LABEL_COLUMN], dtype=torch.long)}


def apply_transforms(
    splits: datasets.DatasetDict, image_processor: Any, *, seed: int = 42, augment: bool = True
) -> ImageClassificationTransform:
    """Preprocess every split lazily: augment ``train`` (unless ``augment=False``), only resize the others.

    Returns:
        The training transform, whose ``epoch`` the trainer advances.
    """
    train_transform = ImageClassificationTransform(image_processor, train=augment, seed=seed)
    for name, split in splits.items():
        split.set_transform(
            train_transform if name == "train" else ImageClassificationTransform(image_processor, train=False)
        )
    return train_transform

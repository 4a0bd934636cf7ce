"""Running a vision tower: one forward pass on the tower's device and dtype, at the size of the pixel values given."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .architectures import VisionTower
from .errors import DataError


def native_size(tower: VisionTower) -> tuple[int, int]:
    """``(height, width)`` of the images the tower was made for (its config's ``image_size``)."""
    size = tower.config.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then restore its training flag."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def run_tower(tower: VisionTower, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    """One forward pass of ``tower`` (the text tower of CLIP is not needed) on the tower's device and dtype.
    Registers of an active adapter are inserted as in a forward pass of the whole model.

    Pixel values of another size than the tower's ``image_size`` get ``interpolate_pos_encoding=True`` where its
    forward takes that argument (ViT, DeiT, CLIP, SigLIP, I-JEPA); DINOv2 and DINOv3 take any size as they are.

    Raises:
        DataError: the pixel values are not of the tower's size and the tower cannot take other sizes.
    """
    reference = next(p for p in tower.module.parameters() if p.is_floating_point())
    native, size = native_size(tower), tuple(pixel_values.shape[-2:])
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

"""Unsupervised single-object discovery with LOST, and the CorLoc metric.

LOST (Siméoni et al., "Localizing Objects with Self-Supervised Transformers and no Labels",
https://arxiv.org/abs/2109.14279) reads the patch features of one image: background patches are many and alike, so
the patch correlated positively with the *fewest* others is a seed on the object; the seed grows over its most
similar low-degree patches, and the box around the connected component that holds the seed is the answer. Artifact
tokens break it: they correlate with almost nothing and become the seed. With registers, DINOv2's CorLoc on VOC07
rises from 35.3 to 55.4 (Darcet et al., https://arxiv.org/abs/2309.16588, Table 3).

>>> import torch
>>> from register_adapter.diagnostics.discovery import corloc, lost
>>> features = torch.full((4, 4, 2), -1.0); features[1:3, 1:3] = 1.0  # a 2 x 2 object on a 4 x 4 grid
>>> lost(features.reshape(16, 2), (4, 4)).box
(1, 1, 3, 3)
>>> corloc([(10, 10, 30, 30)], [[(12, 10, 30, 32)]])
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..architectures import VisionTower, find_vision_tower
from ..errors import InvalidConfigError
from ..forward import eval_mode, run_tower
from ..geometry import input_to_image, patch_grid
from ..hooks import capture
from ..pixels import default_processor, sized_pixel_batches
from ..tokens import split_tokens, token_layout

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive

FEATURES = ("keys", "values", "tokens")


@dataclass
class LostResult:
    """The outcome of LOST on one image, in patch units.

    Attributes:
        box: ``(x0, y0, x1, y1)`` on the patch grid, ``x1``/``y1`` exclusive.
        seed: ``(row, column)`` of the seed patch.
        mask: (h, w) bool, the connected component holding the seed.
    """

    box: Box
    seed: tuple[int, int]
    mask: np.ndarray


def lost(features: torch.Tensor, grid: tuple[int, int], k_patches: int = 100) -> LostResult:
    """LOST on the patch features of one image.

    Args:
        features: (N, C) patch features, row-major over the grid (on the CPU for speed: LOST reads single values).
        grid: ``(h, w)`` with ``h * w == N``.
        k_patches: Size of the low-degree pool the seed expands over (100 in the paper).

    Returns:
        A :class:`LostResult` in patch units.
    """
    h, w = grid
    features = features.float()
    similarity = features @ features.T  # (N, N)
    degree = (similarity > 0).sum(dim=1)  # (N,) positive correlations per patch
    order = torch.argsort(degree, stable=True)  # lowest degree first
    seed = int(order[0])
    pool = order[:k_patches]
    similar = pool[similarity[seed, pool] > 0]  # the seed is in it: its self-similarity is positive
    score = similarity[similar].sum(dim=0).reshape(h, w)  # (h, w)
    components, _ = ndimage.label((score > 0).cpu().numpy())
    row, col = divmod(seed, w)
    mask = components == components[row, col]
    if components[row, col] == 0:  # degenerate features (all zero): the seed alone
        mask = np.zeros((h, w), dtype=bool)
        mask[row, col] = True
    rows, cols = np.nonzero(mask)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return LostResult(box=box, seed=(row, col), mask=mask)


@torch.no_grad()
def patch_features(tower: VisionTower, pixel_values: torch.Tensor, features: str = "keys") -> torch.Tensor:
    """Last-layer patch features that LOST works on, (B, N, C).

    Args:
        tower: The vision tower of a supported model, plain or with registers.
        pixel_values: (B, 3, H, W).
        features: ``"keys"`` (attention keys of the last block, heads concatenated; LOST's choice for DINO),
            ``"values"``, or ``"tokens"`` (the last block's output tokens, each standardised like LayerNorm does).
    """
    if features not in FEATURES:
        raise InvalidConfigError(f"features must be one of {', '.join(map(repr, FEATURES))}; got {features!r}.")
    last = tower.blocks[-1]
    module = last if features == "tokens" else tower.attention_projection(last, features)
    with capture([module]) as captured, eval_mode(tower.module):
        run_tower(tower, pixel_values)
    sequence = captured[module]  # (B, S, C)
    if features == "tokens":
        sequence = torch.nn.functional.layer_norm(sequence, sequence.shape[-1:])  # (B, S, C)
    return split_tokens(sequence, token_layout(tower)).patches  # (B, N, C)


def discover_objects(
    model: nn.Module,
    images: Any,
    *,
    features: str = "keys",
    k_patches: int = 100,
    processor: Any = None,
    batch_size: int = 16,
) -> list[Box]:
    """Find one object per image with LOST.

    Args:
        model: A supported model, plain or with registers (a ``PeftModel`` included).
        images: Pixel values (B, 3, H, W), or images (PIL images, uint8 arrays, paths) turned into pixel values by
            ``processor`` one batch at a time (see :func:`register_adapter.pixels.as_pixel_values`).
        features: ``"keys"`` (default, as LOST does for DINO), ``"values"`` or ``"tokens"``.
        k_patches: Size of the low-degree pool the seed expands over.
        processor: Image processor used when ``images`` are not pixel values; default
            :func:`~register_adapter.pixels.default_processor`.
        batch_size: Images per forward pass.

    Returns:
        One ``(x0, y0, x1, y1)`` box per image (``x1``/``y1`` exclusive). For images, in pixels of each image: the
        processor's resize and centre crop are undone (see :func:`~register_adapter.geometry.input_to_image`), so a
        box may reach into the margin a crop cut off. For pixel values, in pixels of the pixel values.

    >>> from register_adapter.testing import make_artifact_model, make_object_images
    >>> planted = make_artifact_model("dinov2")
    >>> scene = make_object_images(4, planted.image_size)
    >>> boxes = discover_objects(planted.oracle, planted.preprocess(scene.images))
    >>> corloc(boxes, scene.boxes[:, None])
    1.0
    """
    tower = find_vision_tower(model)
    patch_size = tower.patch_size
    if processor is None and not isinstance(images, torch.Tensor):
        processor = default_processor(tower)
    boxes: list[Box] = []
    for batch, image_sizes in sized_pixel_batches(images, tower, processor, batch_size)[1]:
        grid = patch_grid(batch.shape, patch_size)
        batch_features = patch_features(tower, batch, features).float().cpu()  # (b, N, C): one copy per batch
        for index, image_features in enumerate(batch_features):
            x0, y0, x1, y1 = (v * patch_size for v in lost(image_features, grid, k_patches).box)
            if image_sizes is not None:
                height, width = image_sizes[index]
                scale_y, scale_x, top, left = input_to_image(processor, image_sizes[index], tuple(batch.shape[-2:]))
                x0, x1 = (min(max(round((x + left) * scale_x), 0), width) for x in (x0, x1))
                y0, y1 = (min(max(round((y + top) * scale_y), 0), height) for y in (y0, y1))
            boxes.append((x0, y0, x1, y1))
    return boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def corloc(
    predicted: Sequence[Sequence[float]], ground_truth: Sequence[Sequence[Sequence[float]]], iou_threshold: float = 0.5
) -> float:
    """Correct localisation: the fraction of images whose predicted box overlaps *some* ground-truth box of that
    image with IoU >= ``iou_threshold`` (0.5 in LOST and in the registers paper).

    Args:
        predicted: One box per image.
        ground_truth: Per image, a list of boxes (any of them counts), also for a single box (``[[x0, y0, x1, y1]]``).

    Raises:
        InvalidConfigError: not one prediction per image, or boxes that are not 4 numbers (e.g. one ground-truth box
            per image given without its list).
        iou_threshold: Minimum IoU of a correct localisation.
    """
    if len(predicted) != len(ground_truth):
        raise InvalidConfigError(
            f"corloc needs one predicted box per image: got {len(predicted)} predictions for {len(ground_truth)} "
            "images."
        )
    if not predicted:
        raise InvalidConfigError("corloc needs at least one image.")
    for index, (box, truths) in enumerate(zip(predicted, ground_truth)):
        _check_boxes("predicted", index, [box], "one (x0, y0, x1, y1) box per image")
        _check_boxes(
            "ground_truth", index, truths, "a list of (x0, y0, x1, y1) boxes per image ([[x0, y0, x1, y1]] for one)"
        )
    hits = [any(box_iou(p, g) >= iou_threshold for g in truths) for p, truths in zip(predicted, ground_truth)]
    return float(np.mean(hits))


def _check_boxes(name: str, index: int, boxes: Any, expected: str) -> None:
    """Refuse ``boxes`` (of image ``index`` in the argument ``name``) that are not a list of 4-number boxes; an empty
    list is fine (an image without ground-truth boxes counts as missed)."""
    try:
        array = np.asarray(boxes, dtype=float)
    except (TypeError, ValueError):
        array = None
    if array is not None and (array.size == 0 or (array.ndim == 2 and array.shape[1] == 4)):
        return
    given = np.asarray(boxes, dtype=object).tolist() if array is None else array.tolist()
    raise InvalidConfigError(f"corloc's {name} must hold {expected}; image {index} has {given!r}.")

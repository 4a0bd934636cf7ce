"""Finding register neurons: Algorithm 1 of Jiang et al., "Vision Transformers Don't Need Trained Registers"
(https://arxiv.org/abs/2506.08010).

Outlier ("artifact") tokens are written by a few MLP hidden units. Over a set of unlabelled images, every
``(block, unit)`` up to ``top_layer`` is scored by its mean activation at the patch tokens that are outliers at
``outlier_layer``; the ``top_k`` best are the register neurons. The images are streamed in batches, four times or more:

1. the token norms at every block output (one float per token and block), from which the threshold rule of
   :mod:`register_adapter.diagnostics.thresholds` picks the outliers, and the automatic settings are chosen;
2. the scores: a forward hook on the input of each MLP output projection sums the activation at the outlier positions
   of the batch (the forward pass stops after block ``top_layer``). No activation is kept: the sums are
   ``(top_layer + 1) x MLP width`` numbers, whatever the number of images;
3. with ``top_k=None``, the search for the smallest ``k`` whose edit leaves no outlier patch token: the candidate
   edit runs as a real test-time register adapter, ``k`` doubling from 1 until no outlier is left, then bisected;
4. with an explicit ``top_k``, one pass with that edit, for the outlier fractions after it.

>>> from register_adapter import find_register_neurons
>>> from register_adapter.testing import make_artifact_model, make_object_images
>>> planted = make_artifact_model("vit")
>>> pixel_values = planted.preprocess(make_object_images(16, planted.image_size).images)
>>> found = find_register_neurons(planted.model, pixel_values, progress=False)
>>> sorted(found) == sorted((layer - 1, unit) for layer, unit in planted.neurons)  # blocks count from 0
True
>>> found.outlier_fraction_after[-1]
0.0
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from ...architectures import VisionTower, find_vision_tower
from ...diagnostics.artifacts import block_output_norms
from ...diagnostics.thresholds import check_threshold, resolve_threshold
from ...errors import DataError, InvalidConfigError, UnsupportedModelError
from ...forward import eval_mode, run_tower
from ...geometry import patch_grid
from ...hooks import capture
from ...pixels import pixel_batches
from ...tokens import token_layout
from ...tuner.config import NEURON_MODES, RegisterConfig
from ...tuner.model import RegisterModel
from ...tuner.neurons import mlp_width
from .result import SCORES, RegisterNeurons

logger = logging.getLogger(__name__)

#: The automatic ``top_k`` search tries at most this many neurons.
MAX_AUTO_TOP_K = 1024
_SEARCH_ADAPTER = "register_neuron_search"


def _block_index(name: str, value: Any, num_blocks: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and -num_blocks <= value < num_blocks:
        return int(value) % num_blocks
    raise InvalidConfigError(
        f"{name} must be a block index in [0, {num_blocks - 1}] (or counting from the end, in [-{num_blocks}, -1]), "
        f"or None to choose it from the images; got {value!r}."
    )


def _check_top_k(top_k: Any, top_layer: int | None, widths: list[int]) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidConfigError(f"top_k must be a positive whole number, or None to choose it; got {top_k!r}.")
    if top_layer is not None and top_k > sum(widths[: top_layer + 1]):
        raise InvalidConfigError(
            f"top_k={top_k} is larger than the {sum(widths[: top_layer + 1])} candidate neurons (blocks 0-{top_layer}"
            f", {widths[0]} MLP hidden units each). Ask for fewer, or pass a later top_layer."
        )


def _no_outliers_error(threshold: float | str, layer: int | None, num_images: int) -> DataError:
    where = "at any block output" if layer is None else f"at the output of block {layer} (outlier_layer)"
    return DataError(
        f"No outlier patch tokens on the {num_images} images {where} with threshold {threshold!r}, so there is "
        "nothing to find register neurons from. Try more images (plain backgrounds bring artifacts out), "
        "another outlier_layer (artifacts appear from the middle blocks on), or a lower fixed threshold (150 for "
        "DINOv2 ViT-L); register_adapter.find_artifacts shows the norms of every layer."
    )


@contextlib.contextmanager
def _test_time_registers(tower: VisionTower, config: RegisterConfig) -> Iterator[VisionTower]:
    """The model holding ``tower`` with a test-time register adapter for ``config``, then without it again (the
    ``requires_grad`` flags of its parameters as they were)."""
    root = tower.root
    flags = [(parameter, parameter.requires_grad) for parameter in root.parameters()]
    tuner = RegisterModel(root, config, _SEARCH_ADAPTER)
    try:
        yield find_vision_tower(root)
    finally:
        tuner.unload()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _outliers_per_block(
    tower: VisionTower,
    limits: torch.Tensor,
    images: Any,
    processor: Any,
    batch_size: int,
    description: str,
    progress: bool,
) -> np.ndarray:
    """(L,) patch tokens whose norm at each block output exceeds ``limits`` (L,), over all images."""
    blocks = tower.blocks
    special = token_layout(tower).num_special_tokens
    counts = torch.zeros(len(blocks), dtype=torch.long)
    count, pixel_values = pixel_batches(images, tower, processor, batch_size)

    def patch_norms(hidden: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(hidden[:, special:], dim=-1, dtype=torch.float32)  # (b, N)

    with (
        capture(blocks, reduce=patch_norms) as norms,
        eval_mode(tower.module),
        tqdm(total=count, desc=description, unit="img", disable=not progress) as bar,
    ):
        for batch in pixel_values:
            run_tower(tower, batch)
            stacked = torch.stack([norms[block] for block in blocks]).cpu()  # (L, b, N)
            counts += (stacked > limits[:, None, None]).sum(dim=(1, 2))
            bar.update(len(batch))
    return counts.numpy()


def _scores(
    tower: VisionTower,
    outliers: torch.Tensor,
    top_layer: int,
    absolute: bool,
    images: Any,
    processor: Any,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """(top_layer + 1, I) summed activation (or absolute activation) of every MLP hidden unit of blocks
    0..top_layer at the ``outliers`` (n, N) positions."""
    projections = [tower.mlp_out_proj(block) for block in tower.blocks[: top_layer + 1]]
    special = token_layout(tower).num_special_tokens
    sums = torch.zeros(len(projections), projections[0].in_features, dtype=torch.float64)
    count, pixel_values = pixel_batches(images, tower, processor, batch_size)
    seen = 0
    with eval_mode(tower.module), tqdm(total=count, desc="scoring neurons", unit="img", disable=not progress) as bar:
        for batch in pixel_values:
            mask = outliers[seen : seen + len(batch)]  # (b, N)

            def at_outliers(hidden: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                values = hidden[:, special:][mask.to(hidden.device)].float()  # (T, I)
                return (values.abs() if absolute else values).sum(dim=0)  # (I,)

            # The hooks reduce each activation to its sum at once; the pass stops after block top_layer.
            with capture(inputs=projections, reduce=at_outliers, stop=True) as captured:
                run_tower(tower, batch)
            sums += torch.stack([captured[p] for p in projections]).double().cpu()
            seen += len(batch)
            bar.update(len(batch))
    return sums


@torch.no_grad()
def find_register_neurons(
    model: nn.Module,
    images: Any,
    *,
    outlier_layer: int | None = None,
    threshold: float | str = "auto",
    top_layer: int | None = None,
    top_k: int | None = None,
    score: str = "mean",
    mode: str = "neuron_max",
    batch_size: int = 8,
    processor: Any = None,
    progress: bool = True,
) -> RegisterNeurons:
    """Find the register neurons of a vision transformer on unlabelled images (Jiang et al.,
    https://arxiv.org/abs/2506.08010, Algorithm 1). Settings left at ``None`` are chosen from the images, and the
    result says why (``reasons``; also logged).

    Args:
        model: A supported model without adapters whose family has an MLP output projection (every built-in family).
        images: Pixel values (B, 3, H, W), images (PIL, uint8 arrays), image files, folders, or a ``datasets``
            dataset with an ``image`` column. All must have one size after preprocessing. Read once per pass.
        outlier_layer: Block whose output defines the outliers (DINOv2 ViT-L: 22, OpenCLIP ViT-B/16: the last).
            Default: the block output with the most outlier patch tokens (the later one on a tie).
        threshold: Norm threshold rule of :func:`~register_adapter.diagnostics.resolve_threshold`, applied to every
            block output: ``"auto"`` (bimodal split; no outliers on a clean model), a number (150 for DINOv2 ViT-L), or
            ``"mean+<k>std"`` (the paper's rule; it flags some tokens at every layer, so give ``top_layer`` with it).
        top_layer: Last block whose neurons are candidates (DINOv2 ViT-L: 17). Default: the first block whose output
            has outliers; the neurons that write them sit in it or before it.
        top_k: How many neurons. Default: the smallest number of best neurons whose edit (one test-time register,
            ``mode``) leaves no patch token above its block's threshold, on these images; found by doubling from 1,
            then bisecting (at most :data:`MAX_AUTO_TOP_K`).
        score: ``"mean"`` (default, the paper: mean activation at the outlier positions, so units that fire there
            rank first) or ``"mean_abs"`` (the public code: mean absolute activation, which also ranks units that
            are strongly negative there). Both average over all outlier positions of all images.
        mode: The edit the ``top_k`` search and the outlier fractions after it use (see
            :class:`~register_adapter.RegisterConfig` ``neuron_mode``).
        batch_size: Images per forward pass.
        processor: Image processor for images; default :func:`~register_adapter.pixels.default_processor`.
        progress: Show tqdm progress bars.

    Returns:
        A :class:`RegisterNeurons`.

    Raises:
        UnsupportedModelError: the family has no MLP output projection, takes no (B, 3, H, W) images, or drops
            patches (ViTMAE's random masking).
        InvalidConfigError: a setting out of range (checked before any image is read), a model with adapters, or
            ``top_k`` above the number of candidates.
        DataError: no outliers on the images at the outlier layer (or at any layer), unreadable images, or images of
            different sizes.
    """
    tower = find_vision_tower(model)
    if any(isinstance(module, BaseTunerLayer) for module in tower.module.modules()):
        raise InvalidConfigError(
            "find_register_neurons needs the model without adapters, whose outliers are to be found: pass the base "
            "model (peft_model.unload() returns it)."
        )
    blocks = tower.blocks
    widths = [mlp_width(tower, block) for block in blocks]
    num_blocks = len(blocks)
    outlier_layer = _block_index("outlier_layer", outlier_layer, num_blocks)
    top_layer = _block_index("top_layer", top_layer, num_blocks)
    if outlier_layer is not None and top_layer is not None and top_layer > outlier_layer:
        raise InvalidConfigError(
            f"top_layer ({top_layer}) comes after outlier_layer ({outlier_layer}): neurons after the block where the "
            "outliers are read cannot have written them."
        )
    _check_top_k(top_k, top_layer, widths)
    rule = check_threshold(threshold)
    if score not in SCORES:
        raise InvalidConfigError(f"score must be one of {', '.join(SCORES)}, got {score!r}.")
    if mode not in NEURON_MODES:
        raise InvalidConfigError(f"mode must be one of {', '.join(NEURON_MODES)}, got {mode!r}.")
    if isinstance(images, Iterator):  # read once per pass
        images = list(images)

    # Pass 1: token norms at every block output, and the outliers.
    norms, size = block_output_norms(tower, images, processor=processor, batch_size=batch_size, progress=progress)
    patches = norms[..., token_layout(tower).num_special_tokens :]  # (L, n, N)
    grid = patch_grid(size, tower.patch_size)
    if patches.shape[-1] != grid[0] * grid[1]:
        raise UnsupportedModelError(
            f"{type(tower.module).__name__} returned {patches.shape[-1]} patch tokens for a {grid[0]}x{grid[1]} grid; "
            "register neurons are found at fixed patch positions, which models that drop or shuffle patches (ViTMAE's "
            "random masking) do not keep from one pass to the next."
        )
    num_images = patches.shape[1]
    thresholds = [resolve_threshold(rule, layer_norms.numpy().ravel()) for layer_norms in patches]
    limits = torch.tensor([math.inf if t.value is None else t.value for t in thresholds])  # (L,)
    before = (patches > limits[:, None, None]).sum(dim=(1, 2)).numpy()  # (L,)
    num_patches = patches.shape[1] * patches.shape[2]
    reasons = {}
    if outlier_layer is None:
        if not before.any():
            raise _no_outliers_error(threshold, None, num_images)
        outlier_layer = num_blocks - 1 - int(np.argmax(before[::-1]))
        reasons["outlier_layer"] = (
            f"block {outlier_layer}: the block output with the most outlier patch tokens "
            f"({100 * before[outlier_layer] / num_patches:.2f} %)"
        )
    else:
        reasons["outlier_layer"] = f"block {outlier_layer}: given"
    if not before[outlier_layer]:
        raise _no_outliers_error(threshold, outlier_layer, num_images)
    chosen = thresholds[outlier_layer]
    reasons["threshold"] = f"{chosen.value:.4g} at block {outlier_layer}: {chosen.note}"
    if top_layer is None:
        top_layer = int(np.flatnonzero(before)[0])
        reasons["top_layer"] = (
            f"block {top_layer}: the first block whose output has outlier patch tokens; the neurons that write them "
            "sit in it or before it"
        )
    else:
        reasons["top_layer"] = f"block {top_layer}: given"
    _check_top_k(top_k, top_layer, widths)

    # Pass 2: the score of every candidate at the outlier positions.
    outliers = patches[outlier_layer] > chosen.value  # (n, N)
    num_outliers = int(outliers.sum())
    sums = _scores(tower, outliers, top_layer, score == "mean_abs", images, processor, batch_size, progress)
    scores = (sums / num_outliers).float()  # (top_layer + 1, I)
    order = scores.flatten().sort(descending=True, stable=True).indices
    width = scores.shape[1]

    def best(k: int) -> list[tuple[int, int]]:
        return [(int(i) // width, int(i) % width) for i in order[:k]]

    def remaining(k: int) -> np.ndarray:
        config = RegisterConfig(
            num_register_tokens=1,
            init="zeros",
            method="test-time",
            register_neurons=best(k),
            neuron_mode=mode,
            inference_mode=True,
        )
        with _test_time_registers(tower, config) as adapted:
            return _outliers_per_block(adapted, limits, images, processor, batch_size, f"top_k={k}", progress)

    if top_k is not None:
        after = remaining(top_k)
        reasons["top_k"] = f"{top_k}: given"
    else:
        top_k, after, reasons["top_k"] = _search_top_k(remaining, min(len(order), MAX_AUTO_TOP_K), num_images)
    for name in ("threshold", "outlier_layer", "top_layer", "top_k"):
        logger.info("find_register_neurons: %s = %s", name, reasons[name])
    return RegisterNeurons(
        neurons=best(top_k),
        scores=scores,
        score=score,
        outlier_layer=outlier_layer,
        top_layer=top_layer,
        top_k=top_k,
        threshold=chosen,
        num_images=num_images,
        num_outliers=num_outliers,
        mode=mode,
        reasons={name: reasons[name] for name in ("threshold", "outlier_layer", "top_layer", "top_k")},
        thresholds=[t.value for t in thresholds],
        outlier_fraction_before=(before / num_patches).tolist(),
        outlier_fraction_after=(after / num_patches).tolist(),
    )


def _search_top_k(remaining: Any, limit: int, num_images: int) -> tuple[int, np.ndarray, str]:
    """The smallest ``k`` in [1, ``limit``] with ``remaining(k).sum() == 0``: doubling, then bisection (assumes that
    moving more neurons never brings outliers back). Returns ``k``, its outliers per block and the reason."""
    tried: dict[int, np.ndarray] = {}
    k = 1
    while True:
        tried[k] = remaining(k)
        if not tried[k].any() or k == limit:
            break
        k = min(2 * k, limit)
    clean = [k for k, counts in tried.items() if not counts.any()]
    if not clean:
        k = min(tried, key=lambda k: (int(tried[k].sum()), k))
        message = (
            f"no top_k up to {limit} leaves the {num_images} images without outlier patch tokens; top_k={k} leaves "
            f"the fewest ({int(tried[k].sum())}). Pass top_k, a later top_layer, or check the threshold."
        )
        warnings.warn(f"find_register_neurons: {message}", stacklevel=3)
        return k, tried[k], f"{k}: {message}"
    high = min(clean)
    low = max((k for k in tried if k < high), default=0)
    while high - low > 1:
        middle = (low + high) // 2
        tried[middle] = remaining(middle)
        if tried[middle].any():
            low = middle
        else:
            high = middle
    left = f"; the best {low} leave {int(tried[low].sum())} (summed over the block outputs)" if low else ""
    reason = (
        f"{high}: the fewest best neurons whose edit leaves no outlier patch token at any block output on the "
        f"{num_images} images{left}"
    )
    return high, tried[high], reason

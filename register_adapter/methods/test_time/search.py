"""Finding register neurons: Algorithm 1 of Jiang et al., "Vision Transformers Don't Need Trained Registers"
(https://arxiv.org/abs/2506.08010).

Outlier ("artifact") tokens are written by a few MLP hidden units. Over a set of unlabelled images, every
``(block, unit)`` up to ``top_layer`` is scored by its mean activation at the patch tokens that are outliers at
``outlier_layer``; the ``top_k`` best are the register neurons. The images are streamed in batches, several times
(see :mod:`.passes`); memory holds per-block statistics and the ``(top_layer + 1) x MLP width`` sums, whatever the
number of images:

1. the patch-token norms at every block output, summarised (:class:`~register_adapter.diagnostics.NormStats`): the
   threshold rule gives each block's threshold, and the blocks whose norms split into two modes are where the
   outliers are (the automatic ``outlier_layer`` and ``top_layer`` come from them);
2. the outliers counted at every block output, and the scores summed at the outliers of ``outlier_layer``;
3. with ``top_k=None``, the search for the smallest ``k`` whose edit leaves no outlier patch token at the blocks with
   outliers: the candidate edit runs as a real test-time register adapter, ``k`` doubling from 1, then bisected;
4. the chosen edit once more, beside the model without it, for the outliers after it and how much it changes the
   features (``feature_cosine``); an automatic ``top_k`` must keep it at least :data:`MIN_FEATURE_COSINE`.

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

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...architectures import find_vision_tower
from ...diagnostics.thresholds import check_threshold
from ...errors import DataError, InvalidConfigError
from ...tuner.config import NEURON_MODES, RegisterConfig
from ...tuner.neurons import mlp_width
from .passes import EditPass, edit_pass, norm_statistics, outliers_and_scores
from .result import SCORES, RegisterNeurons

logger = logging.getLogger(__name__)

#: The automatic ``top_k`` search tries at most this many neurons.
MAX_AUTO_TOP_K = 1024
#: An automatic ``top_k`` must keep the final tokens this close to the model's own: the mean cosine similarity of CLS,
#: and of the patch tokens that are not outliers, with and without the edit. A guard against an edit that removes the
#: outliers by wrecking the features (moving too many neurons), not a measure of quality.
MIN_FEATURE_COSINE = 0.9
_REASONS = ("threshold", "outlier_layer", "top_layer", "top_k")


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
    if layer is None and threshold != "auto":
        return DataError(
            f"The patch-token norms split into two modes at no block output on the {num_images} images, so there is "
            f"no outlier layer to choose (threshold {threshold!r} is applied at the chosen layer only). Pass "
            "outlier_layer and top_layer (DINOv2 ViT-L: 22 and 17), or try more images (plain backgrounds bring "
            "artifacts out); register_adapter.find_artifacts shows the norms of every layer."
        )
    return DataError(
        f"No outlier patch tokens on the {num_images} images {where} with threshold {threshold!r}, so there is "
        "nothing to find register neurons from. Try more images (plain backgrounds bring artifacts out), "
        "another outlier_layer (artifacts appear from the middle blocks on), or a lower fixed threshold (150 for "
        "DINOv2 ViT-L); register_adapter.find_artifacts shows the norms of every layer."
    )


def _choose_layers(
    outlier_layer: int | None,
    top_layer: int | None,
    split: list[int],
    shares: list[float],
    threshold: float | str,
    num_images: int,
) -> tuple[int, int, dict[str, str]]:
    """``outlier_layer`` and ``top_layer``, chosen where not given, from the blocks whose patch-token norms split into
    two modes (``split``; ``shares``: the part of each block's tokens in the high mode), and why."""
    reasons = {}
    if outlier_layer is None:
        candidates = [b for b in split if top_layer is None or b >= top_layer]
        if not split:
            raise _no_outliers_error(threshold, None, num_images)
        if not candidates:
            raise InvalidConfigError(
                f"top_layer ({top_layer}) comes after every block whose output has outliers (blocks "
                f"{', '.join(map(str, split))}), so no outlier_layer can be chosen: pass an earlier top_layer, or "
                "outlier_layer."
            )
        outlier_layer = max(candidates, key=lambda b: (shares[b], b))
        reasons["outlier_layer"] = (
            f"block {outlier_layer}: of the blocks whose output's patch-token norms split into two modes "
            f"({', '.join(map(str, split))}), the one with the most tokens in the high mode "
            f"({100 * shares[outlier_layer]:.2f} %)"
        )
    else:
        reasons["outlier_layer"] = f"block {outlier_layer}: given"
    if top_layer is None:
        earlier = [b for b in split if b <= outlier_layer]
        top_layer = earlier[0] if earlier else outlier_layer
        reasons["top_layer"] = (
            f"block {top_layer}: the first block whose output's patch-token norms split into two modes (the outliers "
            "appear there); the neurons that write them sit in it or before it"
            if earlier
            else f"block {top_layer}: no block up to outlier_layer {outlier_layer} has patch-token norms that split "
            "into two modes; every block up to it is a candidate"
        )
    else:
        reasons["top_layer"] = f"block {top_layer}: given"
    return outlier_layer, top_layer, reasons


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
    num_register_tokens: int = 1,
    keep_cls: bool = False,
    batch_size: int = 8,
    processor: Any = None,
    progress: bool = True,
) -> RegisterNeurons:
    """Find the register neurons of a vision transformer on unlabelled images (Jiang et al.,
    https://arxiv.org/abs/2506.08010, Algorithm 1). Settings left at ``None`` are chosen from the images, and the
    result says why (``reasons``; also logged).

    Args:
        model: A supported model without adapters whose family has an MLP output projection (every built-in family).
        images: Pixel values (B, 3, H, W), images (PIL, uint8 arrays), image files, folders, a ``datasets`` dataset
            with an ``image`` column (an ``IterableDataset`` too), or any iterable that starts over each time it is
            iterated. All must have one size after preprocessing. Read once per pass, one batch at a time; a one-shot
            iterator (a generator) is refused.
        outlier_layer: Block whose output defines the outliers (DINOv2 ViT-L: 22, OpenCLIP ViT-B/16: the last).
            Default: of the blocks whose output's patch-token norms split into two modes (artifacts), the one with
            the most tokens in the high mode (the later one on a tie), and not before ``top_layer``.
        threshold: Norm threshold rule of :func:`~register_adapter.diagnostics.resolve_threshold`, applied to every
            block output: ``"auto"`` (bimodal split; no outliers on a clean model), a number (150 for DINOv2 ViT-L), or
            ``"mean+<k>std"`` (the paper's rule). The automatic layers do not depend on it.
        top_layer: Last block whose neurons are candidates (DINOv2 ViT-L: 17). Default: the first block whose output's
            norms split into two modes, at most ``outlier_layer``; the neurons that write the outliers sit in it or
            before it.
        top_k: How many neurons. Default: the smallest number of best neurons whose edit leaves no patch token above
            its block's threshold at the blocks with outliers (those whose norms split into two modes, and
            ``outlier_layer``), on these images; found by doubling from 1, then bisecting (at most
            :data:`MAX_AUTO_TOP_K`). The edit must keep ``feature_cosine`` at least :data:`MIN_FEATURE_COSINE`.
        score: ``"mean"`` (default, the paper: mean activation at the outlier positions, so units that fire there
            rank first) or ``"mean_abs"`` (the public code: mean absolute activation, which also ranks units that
            are strongly negative there). Both average over all outlier positions of all images.
        mode, num_register_tokens, keep_cls: The edit that the ``top_k`` search, the outlier fractions after it and
            ``feature_cosine`` are measured with, as :func:`~register_adapter.add_test_time_registers` takes them
            (it defaults to the ones recorded here).
        batch_size: Images per forward pass.
        processor: Image processor for images; default :func:`~register_adapter.pixels.default_processor`.
        progress: Show tqdm progress bars.

    Returns:
        A :class:`RegisterNeurons`.

    Raises:
        UnsupportedModelError: the family has no MLP output projection, takes no (B, 3, H, W) images, or drops
            patches (ViTMAE's random masking).
        InvalidConfigError: a setting out of range (checked before any image is read), a model with adapters,
            ``top_k`` above the number of candidates, or a ``top_layer`` after every block with outliers.
        DataError: no outliers on the images at the outlier layer (or at any layer), no automatic ``top_k`` that
            leaves no outlier or keeps the features (the message says what to pass), a one-shot iterator,
            unreadable images, or images of different sizes.
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
    edit = {"num_register_tokens": num_register_tokens, "neuron_mode": mode, "keep_cls": keep_cls}
    RegisterConfig(method="test-time", **edit)  # InvalidConfigError for a bad register count or keep_cls
    if isinstance(images, Iterator):
        raise DataError(
            f"images is a one-shot iterator ({type(images).__name__}), but find_register_neurons reads the images "
            "once per pass (three or more). Pass a list, a folder, a datasets dataset, or an object whose iter() "
            "starts over (a datasets.IterableDataset, a class with __iter__); it is read one batch at a time."
        )

    # Pass 1: the norms at every block output, summarised; thresholds and automatic layers.
    seen = norm_statistics(tower, images, processor, batch_size, progress)
    num_images, num_patches = seen.num_images, seen.num_patches
    thresholds = [stats.threshold(rule) for stats in seen.stats]
    splits = [stats.threshold("auto") for stats in seen.stats]
    split = [block for block, chosen in enumerate(splits) if chosen.value is not None]
    shares = [stats.fraction_above(chosen.value) for stats, chosen in zip(seen.stats, splits)]
    outlier_layer, top_layer, reasons = _choose_layers(outlier_layer, top_layer, split, shares, threshold, num_images)
    _check_top_k(top_k, top_layer, widths)
    chosen = thresholds[outlier_layer]
    if chosen.value is None:
        raise _no_outliers_error(threshold, outlier_layer, num_images)
    reasons["threshold"] = f"{chosen.value:.4g} at block {outlier_layer}: {chosen.note}"
    limits = torch.tensor([math.inf if t.value is None else t.value for t in thresholds])  # (L,)

    # Pass 2: the outliers at every block output, and the score of every candidate at those of outlier_layer.
    before, sums, num_outliers = outliers_and_scores(
        tower, limits, outlier_layer, top_layer, score == "mean_abs", num_patches, images, processor, batch_size,
        progress,
    )  # fmt: skip
    if not num_outliers:
        raise _no_outliers_error(threshold, outlier_layer, num_images)
    scores = (sums / num_outliers).float()  # (top_layer + 1, I)
    order = scores.flatten().sort(descending=True, stable=True).indices
    width = scores.shape[1]

    def best(k: int) -> list[tuple[int, int]]:
        return [(int(i) // width, int(i) % width) for i in order[:k]]

    def measure(k: int, features: bool = False) -> EditPass:
        config = RegisterConfig(
            init="zeros", method="test-time", register_neurons=best(k), inference_mode=True, **edit
        )
        return edit_pass(
            tower, config, limits, outlier_layer, num_patches, images, processor, batch_size, f"top_k={k}",
            progress, features,
        )  # fmt: skip

    # Passes 3 and on: the edit, searched for (top_k=None) or as given.
    watched = sorted({*split, outlier_layer})
    if top_k is not None:
        measured = measure(top_k, features=True)
        reasons["top_k"] = f"{top_k}: given"
    else:
        context = {"num_images": num_images, "watched": watched, "top_layer": top_layer, "threshold": threshold}
        top_k, measured, reasons["top_k"] = _search_top_k(measure, min(len(order), MAX_AUTO_TOP_K), **context)
    for name in _REASONS:
        logger.info("find_register_neurons: %s = %s", name, reasons[name])
    total = num_images * num_patches
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
        num_register_tokens=num_register_tokens,
        keep_cls=keep_cls,
        reasons={name: reasons[name] for name in _REASONS},
        thresholds=[t.value for t in thresholds],
        outlier_blocks=split,
        outlier_fraction_before=(before / total).tolist(),
        outlier_fraction_after=(measured.counts / total).tolist(),
        feature_cosine=measured.feature_cosine,
    )


def _search_top_k(
    measure: Callable[..., EditPass],
    limit: int,
    *,
    num_images: int,
    watched: list[int],
    top_layer: int,
    threshold: float | str,
) -> tuple[int, EditPass, str]:
    """The smallest ``k`` in [1, ``limit``] whose edit leaves no outlier at the ``watched`` blocks: doubling, then
    bisection (assumes that moving more neurons never brings outliers back), then that edit once more for its
    features. Returns ``k``, what its edit does and the reason.

    Raises:
        DataError: no ``k`` up to ``limit`` leaves no outlier, or the smallest one changes the features too much.
    """

    def left(k: int) -> int:
        if k not in tried:
            tried[k] = int(measure(k).counts[watched].sum())
        return tried[k]

    tried: dict[int, int] = {}
    k = 1
    while left(k) and k < limit:
        k = min(2 * k, limit)
    blocks = ", ".join(map(str, watched))
    if left(k):
        fewest = min(tried, key=lambda k: (tried[k], k))
        raise DataError(
            f"No top_k up to {limit} leaves the {num_images} images without outlier patch tokens at the blocks with "
            f"outliers ({blocks}); top_k={fewest} leaves the fewest ({tried[fewest]}). Pass top_k (e.g. "
            f"top_k={fewest}) to take the best neurons anyway, a later top_layer (now {top_layer}) for more "
            f"candidates, or another threshold (now {threshold!r})."
        )
    high = k
    low = max((k for k in tried if k < high), default=0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if left(middle) else (low, middle)
    measured = measure(high, features=True)
    if measured.feature_cosine is not None and measured.feature_cosine < MIN_FEATURE_COSINE:
        raise DataError(
            f"top_k={high}, the fewest best neurons that leave no outlier patch token on the {num_images} images, "
            f"changes the features: their mean cosine similarity to the model's own is {measured.feature_cosine:.4f}, "
            f"below {MIN_FEATURE_COSINE}. Fewer neurons leave outliers. Check threshold (now {threshold!r}) and "
            "outlier_layer, or pass top_k to take that many anyway."
        )
    rest = f"; the best {low} leave {tried[low]}" if low else ""
    reason = (
        f"{high}: the fewest best neurons whose edit leaves no outlier patch token at the blocks with outliers "
        f"({blocks}) on the {num_images} images{rest}; the features keep a mean cosine similarity of "
        f"{measured.feature_cosine:.4f} to the model's own (at least {MIN_FEATURE_COSINE})"
    )
    return high, measured, reason

"""The passes of :func:`~register_adapter.find_register_neurons` over the images, one batch at a time. Each keeps
per-block sums and counts, never a value per image, so memory does not grow with the number of images; the images are
read again for every pass (a sequence, a folder, a dataset or any iterable that starts over when iterated again).

1. :func:`norm_statistics`: the patch-token norms at every block output, as :class:`NormStats` (the thresholds and
   the automatic settings come from them);
2. :func:`outliers_and_scores`: per batch, a full forward pass counts the patch tokens above each block's threshold
   and marks the outliers at ``outlier_layer``; a second one, stopped after block ``top_layer``, sums every MLP
   hidden unit's activation at those positions;
3. :func:`edit_pass`: a candidate edit as a real test-time register adapter, counting the outliers it leaves and, when
   asked, comparing the final features with those of the model without it (the same batch, the adapter disabled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...architectures import VisionTower, find_vision_tower
from ...diagnostics.artifacts import iter_block_norms
from ...diagnostics.norm_stats import NormStats
from ...errors import UnsupportedModelError
from ...forward import eval_mode, run_tower
from ...geometry import patch_grid
from ...hooks import capture
from ...pixels import pixel_batches
from ...tuner.config import RegisterConfig
from ...tuner.model import RegisterModel

_SEARCH_ADAPTER = "register_neuron_search"


def _patch_norms(num_patches: int) -> Any:
    def reduce(hidden: torch.Tensor) -> torch.Tensor:
        # Patches come last in every token layout, registers or not.
        return torch.linalg.vector_norm(hidden[:, -num_patches:], dim=-1, dtype=torch.float32)  # (b, N)

    return reduce


@dataclass
class NormPass:
    """What the first pass saw: the patch-token norms of every block output, the number of images and of patches."""

    stats: list[NormStats]
    num_images: int
    num_patches: int


def norm_statistics(tower: VisionTower, images: Any, processor: Any, batch_size: int, progress: bool) -> NormPass:
    """Pass 1. Raises ``DataError`` for images of different sizes, ``UnsupportedModelError`` for a model that drops
    patches."""
    stats = [NormStats() for _ in tower.blocks]
    seen = num_patches = 0
    for norms, size in iter_block_norms(tower, images, processor, batch_size, progress, "token norms"):
        grid = patch_grid(size, tower.patch_size)
        num_patches = grid[0] * grid[1]
        tokens = norms.shape[-1] - tower.num_prefix_tokens
        if tokens != num_patches:
            raise UnsupportedModelError(
                f"{type(tower.module).__name__} returned {tokens} patch tokens for a {grid[0]}x{grid[1]} grid; "
                "register neurons are found at fixed patch positions, which models that drop or shuffle patches "
                "(ViTMAE's random masking) do not keep from one pass to the next."
            )
        for block_stats, block_norms in zip(stats, norms[..., -num_patches:].numpy()):  # (b, N) per block
            block_stats.add(block_norms)
        seen += norms.shape[1]
    return NormPass(stats, seen, num_patches)


def outliers_and_scores(
    tower: VisionTower,
    limits: torch.Tensor,
    outlier_layer: int,
    top_layer: int,
    absolute: bool,
    num_patches: int,
    images: Any,
    processor: Any,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, torch.Tensor, int]:
    """Pass 2: (L,) patch tokens above ``limits`` (L,) at every block output, (top_layer + 1, I) the summed activation
    (or absolute activation) of every MLP hidden unit of blocks 0..top_layer at the outliers of ``outlier_layer``, and
    the number of those outliers."""
    blocks = tower.blocks
    projections = [tower.mlp_out_proj(block) for block in blocks[: top_layer + 1]]
    counts = torch.zeros(len(blocks), dtype=torch.long)
    sums = torch.zeros(len(projections), projections[0].in_features, dtype=torch.float64)
    num_outliers = 0
    count, pixel_values = pixel_batches(images, tower, processor, batch_size)
    with (
        eval_mode(tower.module),
        tqdm(total=count, desc="scoring neurons", unit="img", disable=not progress) as bar,
    ):
        for batch in pixel_values:
            with capture(blocks, reduce=_patch_norms(num_patches)) as norms:
                run_tower(tower, batch)
            stacked = torch.stack([norms[block] for block in blocks]).cpu()  # (L, b, N)
            counts += (stacked > limits[:, None, None]).sum(dim=(1, 2))
            mask = stacked[outlier_layer] > limits[outlier_layer]  # (b, N)
            num_outliers += int(mask.sum())
            if mask.any():

                def at_outliers(hidden: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                    values = hidden[:, -num_patches:][mask.to(hidden.device)].float()  # (T, I)
                    return (values.abs() if absolute else values).sum(dim=0)  # (I,)

                # The hooks reduce each activation to its sum at once; the pass stops after block top_layer.
                with capture(inputs=projections, reduce=at_outliers, stop=True) as captured:
                    run_tower(tower, batch)
                sums += torch.stack([captured[p] for p in projections]).double().cpu()
            bar.update(len(batch))
    return counts.numpy(), sums, num_outliers


@contextlib.contextmanager
def _test_time_registers(tower: VisionTower, config: RegisterConfig) -> Iterator[tuple[VisionTower, RegisterModel]]:
    """The tower with a test-time register adapter for ``config`` and its tuner, then without it again (the
    ``requires_grad`` flags of its parameters as they were)."""
    root = tower.root
    flags = [(parameter, parameter.requires_grad) for parameter in root.parameters()]
    tuner = RegisterModel(root, config, _SEARCH_ADAPTER)
    try:
        yield find_vision_tower(root), tuner
    finally:
        tuner.unload()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@dataclass
class EditPass:
    """What a candidate edit does on the images.

    Attributes:
        counts: (L,) patch tokens above their block's threshold, per block output.
        feature_cosine: The smaller of the mean cosine similarity of CLS (where there is one) and of the patch
            tokens that are not outliers at ``outlier_layer``, between the final tokens with and without the edit;
            ``None`` when not measured.
    """

    counts: np.ndarray
    feature_cosine: float | None = None


def edit_pass(
    tower: VisionTower,
    config: RegisterConfig,
    limits: torch.Tensor,
    outlier_layer: int,
    num_patches: int,
    images: Any,
    processor: Any,
    batch_size: int,
    description: str,
    progress: bool,
    features: bool = False,
) -> EditPass:
    """Pass 3 (and later): the edit of ``config``'s neurons as an adapter; with ``features``, each batch also runs
    without it, for :attr:`EditPass.feature_cosine`."""
    counts = torch.zeros(len(limits), dtype=torch.long)
    sums = {"cls": [0.0, 0], "patches": [0.0, 0]}
    count, pixel_values = pixel_batches(images, tower, processor, batch_size)
    with (
        _test_time_registers(tower, config) as (adapted, tuner),
        eval_mode(adapted.module),
        tqdm(total=count, desc=description, unit="img", disable=not progress) as bar,
    ):
        blocks = adapted.blocks
        for batch in pixel_values:
            if features:
                tuner.disable_adapter_layers()
                with capture([blocks[outlier_layer]], reduce=_patch_norms(num_patches)) as base_norms:
                    base = run_tower(adapted, batch).last_hidden_state  # (b, S, D)
                tuner.enable_adapter_layers()
            with capture(blocks, reduce=_patch_norms(num_patches)) as norms:
                edited = run_tower(adapted, batch).last_hidden_state
            counts += (torch.stack([norms[block] for block in blocks]).cpu() > limits[:, None, None]).sum(dim=(1, 2))
            if features:
                cosine = torch.nn.functional.cosine_similarity(edited.float(), base.float(), dim=-1)  # (b, S)
                clean = base_norms[blocks[outlier_layer]] <= limits[outlier_layer].to(base.device)  # (b, N)
                patches = cosine[:, -num_patches:][clean]
                sums["patches"] = [sums["patches"][0] + float(patches.sum()), sums["patches"][1] + len(patches)]
                if tower.spec.has_cls:
                    sums["cls"] = [sums["cls"][0] + float(cosine[:, 0].sum()), sums["cls"][1] + len(batch)]
            bar.update(len(batch))
    means = [total / number for total, number in sums.values() if number]
    return EditPass(counts.numpy(), min(means) if features and means else None)

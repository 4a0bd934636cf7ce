"""Artifact diagnostics: which tokens have outlier norms, where, from which layer on, and did registers remove them.

Darcet et al. (https://arxiv.org/abs/2309.16588, Sec. 2) found that large ViTs write high-norm tokens (about 10x the
others, on about 2 % of the patches, from the middle layers on) into redundant background patches. The norms are
measured here on the *residual stream*: the output of every transformer block, read with forward hooks. The final
LayerNorm of HF models (``last_hidden_state``) flattens norms, which is why outliers seem to vanish there.

>>> from register_adapter import find_artifacts
>>> from register_adapter.testing import make_artifact_model, make_object_images
>>> planted = make_artifact_model("vit")
>>> scene = make_object_images(8, planted.image_size)
>>> report = find_artifacts(planted.model, planted.preprocess(scene.images))
>>> report.first_outlier_layer == planted.layer
True
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import VisionTower, find_vision_tower
from ..errors import InvalidConfigError, UnsupportedModelError
from ..forward import eval_mode, run_tower
from ..geometry import patch_grid
from ..hooks import capture
from ..pixels import different_sizes_error, pixel_batches
from ..tokens import TokenLayout, split_tokens, token_layout
from .thresholds import check_threshold, resolve_threshold

# -- the report ------------------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Patch-token norm statistics of one layer, over all images.

    Attributes:
        layer: Index into ``hidden_states``: ``l`` is the output of block ``l`` (1-based).
        max_norm: Largest patch-token norm.
        median_norm: Median patch-token norm.
        p99_norm: 99th percentile of the patch-token norms.
        threshold: The threshold applied at this layer (``None``: no outliers).
        outlier_fraction: Fraction of patch tokens above the threshold.
        cls_norm: Mean norm of the CLS token (``None`` without CLS).
        register_norms: Mean norm of each register (native ones first).
    """

    layer: int
    max_norm: float
    median_norm: float
    p99_norm: float
    threshold: float | None
    outlier_fraction: float
    cls_norm: float | None
    register_norms: list[float]


@dataclass
class ImageArtifacts:
    """The artifacts of one image at the report's layer.

    Attributes:
        source: File name or ``"image <i>"``.
        norm_map: (h, w) patch-token norms.
        outlier_mask: (h, w) bool, norms above the threshold.
        outlier_positions: ``(row, column)`` of every outlier.
        cls_norm: Norm of the CLS token (``None`` without CLS).
        register_norms: Norm of each register.
    """

    source: str
    norm_map: np.ndarray
    outlier_mask: np.ndarray
    outlier_positions: list[tuple[int, int]]
    cls_norm: float | None
    register_norms: list[float]


@dataclass
class ArtifactReport:
    """What :func:`find_artifacts` found.

    Attributes:
        layer: The layer of the per-image maps (index into ``hidden_states``).
        threshold_method: ``"fixed"``, ``"mean+<k>std"`` or ``"bimodal"``.
        threshold_note: How the threshold was chosen, in words.
        first_outlier_layer: First layer with any outlier, ``None`` if none.
        grid: ``(h, w)`` of the patch grid.
        num_registers: Registers in the sequence (native ones and those of the active adapter).
        layers: Statistics of every block output, ``layers[i].layer == i + 1``.
        images: Per-image maps at ``layer``.
        patch_norms: (L, n, N) every patch-token norm (for histograms; not serialised).
    """

    layer: int
    threshold_method: str
    threshold_note: str
    first_outlier_layer: int | None
    grid: tuple[int, int]
    num_registers: int
    layers: list[LayerStats]
    images: list[ImageArtifacts]
    patch_norms: np.ndarray = field(repr=False)

    @property
    def layer_stats(self) -> LayerStats:
        """The statistics of ``layer``: ``layers[layer - 1]``."""
        return self.layers[self.layer - 1]

    @property
    def threshold(self) -> float | None:
        """The threshold applied at ``layer`` (``None``: no outliers found)."""
        return self.layer_stats.threshold

    @property
    def outlier_fraction(self) -> float:
        """Fraction of patch tokens that are outliers at ``layer``."""
        return self.layer_stats.outlier_fraction

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (maps as nested lists, norms rounded to 4 significant digits)."""

        def number(value: float | None) -> float | None:
            return None if value is None else float(f"{value:.4g}")

        return {
            "layer": self.layer,
            "threshold": number(self.threshold),
            "threshold_method": self.threshold_method,
            "threshold_note": self.threshold_note,
            "first_outlier_layer": self.first_outlier_layer,
            "outlier_fraction": number(self.outlier_fraction),
            "grid": list(self.grid),
            "num_registers": self.num_registers,
            "layers": [
                {
                    "layer": s.layer,
                    "max_norm": number(s.max_norm),
                    "median_norm": number(s.median_norm),
                    "p99_norm": number(s.p99_norm),
                    "threshold": number(s.threshold),
                    "outlier_fraction": number(s.outlier_fraction),
                    "cls_norm": number(s.cls_norm),
                    "register_norms": [number(v) for v in s.register_norms],
                }
                for s in self.layers
            ],
            "images": [
                {
                    "source": image.source,
                    "num_outliers": len(image.outlier_positions),
                    "outlier_positions": [list(p) for p in image.outlier_positions],
                    "cls_norm": number(image.cls_norm),
                    "register_norms": [number(v) for v in image.register_norms],
                    "norm_map": [[number(v) for v in row] for row in image.norm_map.tolist()],
                }
                for image in self.images
            ],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


# -- measuring -------------------------------------------------------------------------------------------------------


def token_norms(hidden: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32)  # (b, S, D) -> (b, S)


@torch.no_grad()
def iter_block_norms(
    tower: VisionTower, images: Any, processor: Any, batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Per batch of images, the token norms at the output of every transformer block, (L, b, S) on the CPU, all
    tokens (registers included), and the (height, width) of the pixel values.

    Forward hooks on the blocks reduce each output to its norms on the fly, on the model's device; the norms of a
    batch are copied to the CPU once, after its forward pass.

    Raises:
        DataError: the images do not all have one size after preprocessing (their maps would not share a grid).
    """
    blocks = tower.blocks
    size: tuple[int, int] | None = None
    seen = 0
    count, pixel_values = pixel_batches(images, tower, processor, batch_size)
    with (
        capture(blocks, reduce=token_norms) as norms,
        eval_mode(tower.module),
        tqdm(total=count, desc=desc, unit="img", disable=not progress) as bar,
    ):
        for batch in pixel_values:
            if size is not None and tuple(batch.shape[-2:]) != size:
                raise different_sizes_error(seen, batch.shape[-2:], 0, size)
            size, seen = tuple(batch.shape[-2:]), seen + len(batch)
            run_tower(tower, batch)
            yield torch.stack([norms[block] for block in blocks]).cpu(), size  # (L, b, S)
            bar.update(len(batch))


def block_output_norms(
    tower: VisionTower, images: Any, *, processor: Any = None, batch_size: int = 8, progress: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Token norms at the output of every transformer block, (L, B, S), all tokens (registers included), and the
    (height, width) of the pixel values (see :func:`iter_block_norms`)."""
    batches = list(iter_block_norms(tower, images, processor, batch_size, progress, "find_artifacts"))
    return torch.cat([norms for norms, _ in batches], dim=1), batches[-1][1]  # (L, B, S)


def check_layer(layer: Any, num_layers: int) -> int:
    """The layer of the per-image maps as an index into ``hidden_states`` in [1, ``num_layers``].

    Args:
        layer: ``None`` (the last block's output), a whole number in [1, ``num_layers``] or, counting from the end,
            in [-``num_layers``, -1] (numpy integers and 0-d tensors too).
        num_layers: Number of transformer blocks.

    Raises:
        InvalidConfigError: anything else, with the value received.
    """
    if layer is None:
        return num_layers
    if getattr(layer, "ndim", None) == 0 and hasattr(layer, "item"):  # 0-d numpy array or torch tensor
        layer = layer.item()
    if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
        layer = int(layer)
        index = layer + num_layers + 1 if layer < 0 else layer
        if 1 <= index <= num_layers:
            return index
    raise InvalidConfigError(
        f"layer must be a whole number in [1, {num_layers}], or in [-{num_layers}, -1] counting from the end; "
        f"got {layer!r}."
    )


def find_artifacts(
    model: nn.Module,
    images_or_pixel_values: Any,
    *,
    layer: int | None = None,
    threshold: float | str = "auto",
    processor: Any = None,
    batch_size: int = 8,
    progress: bool = False,
    sources: Sequence[str] | None = None,
) -> ArtifactReport:
    """Measure token norms on the residual stream and find the outlier ("artifact") tokens.

    Works on every supported family, with or without registers (a ``PeftModel`` with a register adapter included: its
    registers are reported apart from the patches).

    Args:
        model: A supported model (``find_vision_tower`` locates its blocks).
        images_or_pixel_values: Pixel values (B, 3, H, W), or images (PIL, uint8 arrays, file paths). All must have
            one size after preprocessing (one patch grid); another size than the model's ``image_size`` is fine
            where the model can interpolate its position embeddings (see :func:`~register_adapter.forward.run_tower`).
        layer: The layer of the per-image maps, as an index into ``hidden_states`` (1 = first block's output,
            negative counts from the end; see :func:`check_layer`). Default: the last block's output.
        threshold: ``"auto"`` (default): the valley below a second, high-norm mode of each layer's log-norm histogram
            (:func:`~register_adapter.thresholds.bimodal_threshold`): artifacts form such a mode (Darcet et al., Fig. 3), clean models have none,
            and no model-specific number is needed. Or a positive number (fixed; 150 for DINOv2 ViT-L/g in Darcet et
            al.; numpy scalars and 0-d tensors too) or ``"mean+<k>std"`` (e.g. ``"mean+3std"``, Jiang et al.; it
            flags whatever lies above the cut, second mode or not: 0-0.4 % of the patch tokens per layer of the clean
            tiny random models, where ``"auto"`` flags none).
        processor: Image processor for images; default :func:`~register_adapter.pixels.default_processor`.
        batch_size: Images per forward pass.
        progress: Show a tqdm progress bar.
        sources: Names of the images in the report (default ``"image <i>"``).

    Returns:
        An :class:`ArtifactReport`; ``report.to_json(path)`` writes it.
    """
    tower = find_vision_tower(model)
    num_layers = len(tower.blocks)
    layer = check_layer(layer, num_layers)
    threshold = check_threshold(threshold)  # before the forward passes: a bad rule costs nothing
    norms, size = block_output_norms(  # (L, B, S)
        tower, images_or_pixel_values, processor=processor, batch_size=batch_size, progress=progress
    )
    count = norms.shape[1]
    sources = list(sources) if sources is not None else [f"image {i}" for i in range(count)]
    if len(sources) != count:
        raise InvalidConfigError(f"Got {len(sources)} sources for {count} images.")
    grid = patch_grid(size, tower.patch_size)
    layout = token_layout(tower)  # after the forward passes: the lengths of their sequences are known
    groups = split_tokens(norms.flatten(0, 1).unsqueeze(-1), layout)  # sequences of norms, one per (layer, image)
    patches = groups.patches.squeeze(-1).reshape(num_layers, count, -1).numpy()  # (L, B, N)
    if patches.shape[-1] != grid[0] * grid[1]:
        raise UnsupportedModelError(
            f"{type(tower.module).__name__} returned {patches.shape[-1]} patch tokens for a {grid[0]}x{grid[1]} grid; "
            "find_artifacts needs every patch in order (models that drop or shuffle patches, like ViTMAE's random "
            "masking, are not supported)."
        )
    cls = groups.cls.squeeze(-1).reshape(num_layers, -1).numpy() if groups.cls is not None else None  # (L, B)
    registers = groups.registers.squeeze(-1).reshape(num_layers, count, -1).numpy()  # (L, B, R)
    return _report(patches, cls, registers, layer, threshold, grid, sources, layout)


def _report(
    patches: np.ndarray,
    cls: np.ndarray | None,
    registers: np.ndarray,
    layer: int,
    rule: float | str,
    grid: tuple[int, int],
    sources: list[str],
    layout: TokenLayout,
) -> ArtifactReport:
    thresholds = [resolve_threshold(rule, layer_norms.ravel()) for layer_norms in patches]
    stats = []
    for index, (layer_norms, chosen) in enumerate(zip(patches, thresholds)):
        outliers = layer_norms > chosen.value if chosen.value is not None else np.zeros_like(layer_norms, bool)
        stats.append(
            LayerStats(
                layer=index + 1,
                max_norm=float(layer_norms.max()),
                median_norm=float(np.median(layer_norms)),
                p99_norm=float(np.percentile(layer_norms, 99)),
                threshold=chosen.value,
                outlier_fraction=float(outliers.mean()),
                cls_norm=float(cls[index].mean()) if cls is not None else None,
                register_norms=registers[index].mean(axis=0).tolist(),
            )
        )
    chosen = thresholds[layer - 1]
    images = []
    for i, source in enumerate(sources):
        norm_map = patches[layer - 1, i].reshape(grid)  # (h, w)
        mask = norm_map > chosen.value if chosen.value is not None else np.zeros(grid, dtype=bool)
        images.append(
            ImageArtifacts(
                source=source,
                norm_map=norm_map,
                outlier_mask=mask,
                outlier_positions=[(int(r), int(c)) for r, c in zip(*np.nonzero(mask))],
                cls_norm=float(cls[layer - 1, i]) if cls is not None else None,
                register_norms=registers[layer - 1, i].tolist(),
            )
        )
    first = next((s.layer for s in stats if s.outlier_fraction > 0), None)
    return ArtifactReport(
        layer=layer,
        threshold_method=chosen.method,
        threshold_note=chosen.note,
        first_outlier_layer=first,
        grid=grid,
        num_registers=layout.num_all_registers,
        layers=stats,
        images=images,
        patch_norms=patches,
    )

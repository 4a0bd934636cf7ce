"""Pictures of artifacts: per-image panels, per-layer norm histograms, and before/after comparisons.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global state, no display needed);
:func:`save_png` writes it with the Agg backend. The panels follow the figures of Darcet et al.
(https://arxiv.org/abs/2309.16588): the norm map, the last-layer CLS attention (Fig. 1) and the first principal
components of the patch features as RGB (Fig. 7).

>>> from register_adapter import find_artifacts
>>> from register_adapter.testing import make_artifact_model, make_object_images
>>> from register_adapter.diagnostics.viz import artifact_panel, patch_views, save_png
>>> planted = make_artifact_model("dinov2")
>>> scene = make_object_images(2, planted.image_size)
>>> pixel_values = planted.preprocess(scene.images)
>>> report = find_artifacts(planted.model, pixel_values)
>>> views = patch_views(planted.model, pixel_values)
>>> save_png(artifact_panel(report.images[0], views, 0, image=scene.images[0]), "panel.png")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..architectures import VisionTower, find_vision_tower
from ..forward import eval_mode, run_tower
from ..geometry import patch_grid
from ..hooks import capture
from ..pixels import batches
from ..tokens import split_tokens, token_layout
from .artifacts import ArtifactReport, ImageArtifacts

_OUTLIER_COLOR = (1.0, 0.1, 0.1, 0.75)


@dataclass
class PatchViews:
    """What the panels show besides the norms.

    Attributes:
        attention: (B, h, w) last-layer attention from CLS to each patch, averaged over heads; for families without
            CLS, the mean attention each patch receives.
        attention_kind: ``"CLS attention"`` or ``"mean attention received"``.
        pca: (B, h, w, 3) the first three principal components of the last block's patch tokens (standardised per
            token, as LayerNorm does; components fitted jointly over the batch), each scaled to [0, 1].
    """

    attention: np.ndarray
    attention_kind: str
    pca: np.ndarray


@contextlib.contextmanager
def eager_attention(tower: VisionTower) -> Iterator[None]:
    """Switch the model holding ``tower`` to eager attention (the only implementation that returns attention
    weights), then back."""
    root = tower.root
    previous = root.config._attn_implementation
    root.set_attn_implementation("eager")
    try:
        yield
    finally:
        root.set_attn_implementation(previous)


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """The first three principal components of ``features`` (n, D), each scaled to [0, 1] between its 1st and 99th
    percentile: (n, 3)."""
    centered = features.float() - features.float().mean(0)  # (n, D)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)  # v: (min(n, D), D)
    components = centered @ v[:3].T  # (n, 3)
    if components.shape[1] < 3:
        components = torch.nn.functional.pad(components, (0, 3 - components.shape[1]))
    low, high = components.quantile(0.01, dim=0), components.quantile(0.99, dim=0)  # (3,)
    return ((components - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)


@torch.no_grad()
def patch_views(model: nn.Module, pixel_values: torch.Tensor, *, batch_size: int = 8) -> PatchViews:
    """Last-layer attention maps and PCA maps of ``pixel_values`` (B, 3, H, W).

    Runs one forward pass with eager attention (switched back afterwards).
    """
    tower = find_vision_tower(model)
    h, w = patch_grid(pixel_values.shape, tower.patch_size)
    last = tower.blocks[-1]
    attentions, tokens = [], []
    with capture([last]) as captured, eval_mode(tower.module), eager_attention(tower):
        for batch in batches(pixel_values, batch_size):
            attention = run_tower(tower, batch, output_attentions=True).attentions[-1].float()  # (b, H, S, S)
            layout = token_layout(tower)
            received = attention[:, :, 0] if layout.has_cls else attention.mean(2)  # (b, H, S)
            weights = received.mean(1).unsqueeze(-1)  # (b, S, 1)
            attentions.append(split_tokens(weights, layout).patches.squeeze(-1).cpu())  # (b, N)
            tokens.append(split_tokens(captured[last].float(), layout).patches.cpu())  # (b, N, D)
    features = torch.nn.functional.layer_norm(torch.cat(tokens), (tokens[0].shape[-1],))  # (B, N, D)
    rgb = pca_rgb(features.flatten(0, 1)).reshape(len(features), h, w, 3)  # (B, h, w, 3)
    return PatchViews(
        attention=torch.cat(attentions).reshape(-1, h, w).numpy(),
        attention_kind="CLS attention" if layout.has_cls else "mean attention received",
        pca=rgb.numpy(),
    )


def display_image(pixel_values: torch.Tensor, processor: Any = None) -> np.ndarray:
    """The image the model saw, (H, W, 3) float in [0, 1], from pixel values (3, H, W).

    The processor's normalisation (``image_mean``, ``image_std``) is undone when given; otherwise each channel is
    min-max scaled.
    """
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is not None and std is not None and getattr(processor, "do_normalize", True):
        shape = (-1, 1, 1)
        image = pixel_values.cpu() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)  # (3, H, W)
    else:
        low = pixel_values.amin(dim=(1, 2), keepdim=True)
        high = pixel_values.amax(dim=(1, 2), keepdim=True)
        image = (pixel_values - low) / (high - low).clamp_min(1e-12)  # (3, H, W)
    return image.clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _show_map(ax: Any, values: np.ndarray, title: str, image_shape: tuple[int, int], **kwargs: Any) -> Any:
    height, width = image_shape
    artist = ax.imshow(values, interpolation="nearest", extent=(0, width, height, 0), **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return artist


def _outlier_overlay(mask: np.ndarray) -> np.ndarray:
    overlay = np.zeros((*mask.shape, 4))
    overlay[mask] = _OUTLIER_COLOR
    return overlay


def artifact_panel(
    image_report: ImageArtifacts,
    views: PatchViews | None = None,
    index: int = 0,
    *,
    image: np.ndarray | None = None,
    threshold: float | None = None,
) -> Figure:
    """One image in five pictures: the image, its patch-norm map, the outlier mask over the image, the last-layer
    attention map and the PCA map.

    Args:
        image_report: One entry of ``ArtifactReport.images``.
        views: :func:`patch_views` of the batch the image belongs to (the last two pictures are left out without it).
        index: Position of the image in that batch.
        image: The image as the model saw it, (H, W, 3) uint8 or float in [0, 1] (see :func:`display_image`).
        threshold: The norm threshold, drawn on the colour bar.
    """
    shape = image.shape[:2] if image is not None else image_report.norm_map.shape
    columns = 5 if views is not None else 3
    fig = Figure(figsize=(2.4 * columns, 2.7), layout="constrained")
    axes = fig.subplots(1, columns)
    count = len(image_report.outlier_positions)
    name = Path(image_report.source).name
    fig.suptitle(f"{name}: {count} outlier token{'s' if count != 1 else ''}", fontsize=10)
    if image is not None:
        axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[0].set_axis_off()
    norms = _show_map(axes[1], image_report.norm_map, "patch-token norm", shape, cmap="viridis")
    bar = fig.colorbar(norms, ax=axes[1], fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    if threshold is not None and threshold <= image_report.norm_map.max():
        bar.ax.axhline(threshold, color="red", linewidth=1.5)
    if image is not None:
        axes[2].imshow(image, alpha=0.6)
    _show_map(axes[2], _outlier_overlay(image_report.outlier_mask), "outliers (red)", shape)
    if views is not None:
        _show_map(axes[3], views.attention[index], views.attention_kind, shape, cmap="inferno")
        _show_map(axes[4], views.pca[index], "PCA of patch features", shape)
    return fig


def norm_histograms(report: ArtifactReport, *, columns: int = 4, title: str | None = None) -> Figure:
    """One histogram of patch-token norms per layer (log scale), with the layer's threshold as a red line.

    A layer with artifacts shows a second mode far to the right of the main one.
    """
    num_layers = len(report.layers)
    columns = min(columns, num_layers)
    rows = math.ceil(num_layers / columns)
    fig = Figure(figsize=(2.6 * columns, 1.9 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    norms = report.patch_norms
    low, high = max(float(norms.min()), 1e-6), float(norms.max())
    bins = np.geomspace(low, high * 1.001, 60)
    for ax, stats, layer_norms in zip(axes, report.layers, norms):
        ax.hist(layer_norms.ravel(), bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if stats.threshold is not None:
            ax.axvline(stats.threshold, color="red", linewidth=1)
        ax.set_title(f"layer {stats.layer}: {100 * stats.outlier_fraction:.1f}% outliers", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[num_layers:]:
        ax.set_axis_off()
    fig.suptitle(title or f"patch-token norms per layer ({report.threshold_method} threshold)", fontsize=10)
    return fig


def before_after(
    base: ArtifactReport,
    adapted: ArtifactReport,
    images: Sequence[np.ndarray] | None = None,
    *,
    labels: tuple[str, str] = ("base", "adapter"),
    max_images: int = 4,
) -> Figure:
    """Norm maps and outliers of the same images without and with registers, on one colour scale per image, and the
    outlier fraction per layer of both.

    Args:
        base: Report of the model without the adapter.
        adapted: Report of the same images with the adapter.
        images: The images as the model saw them (optional, drawn under the outlier masks).
        labels: Names of the two models.
        max_images: At most this many image rows.
    """
    count = min(len(base.images), max_images)
    fig = Figure(figsize=(12.0, 2.5 * count + 1.6), layout="constrained")
    grid = fig.add_gridspec(count + 1, 5, height_ratios=[1.0] * count + [0.55])
    for row in range(count):
        image = images[row] if images is not None else None
        maps = (base.images[row], adapted.images[row])
        high = max(m.norm_map.max() for m in maps)
        low = min(m.norm_map.min() for m in maps)
        ax = fig.add_subplot(grid[row, 0])
        if image is not None:
            ax.imshow(image)
        ax.set_title(Path(base.images[row].source).name, fontsize=9)
        ax.set_axis_off()
        shape = image.shape[:2] if image is not None else maps[0].norm_map.shape
        for offset, (label, m) in enumerate(zip(labels, maps)):
            ax = fig.add_subplot(grid[row, 1 + 2 * offset])
            artist = _show_map(ax, m.norm_map, f"{label}: norms", shape, cmap="viridis", vmin=low, vmax=high)
            ax = fig.add_subplot(grid[row, 2 + 2 * offset])
            if image is not None:
                ax.imshow(image, alpha=0.6)
            _show_map(ax, _outlier_overlay(m.outlier_mask), f"{label}: {len(m.outlier_positions)} outliers", shape)
        fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[count, :])
    for label, report, style in zip(labels, (base, adapted), ("o-", "s--")):
        layers = [s.layer for s in report.layers]
        ax.plot(layers, [100 * s.outlier_fraction for s in report.layers], style, label=label)
    ax.set_xlabel("layer (block output)", fontsize=8)
    ax.set_ylabel("outlier tokens (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"outlier tokens at layer {base.layer}: {100 * base.outlier_fraction:.1f}% ({labels[0]}) -> "
        f"{100 * adapted.outlier_fraction:.1f}% ({labels[1]})",
        fontsize=10,
    )
    return fig


def norm_scale_figure(report: ArtifactReport) -> Figure:
    """Max, 99th percentile and median patch-token norm per layer, and the CLS and register norms (log scale)."""
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    ax = fig.subplots()
    layers = [s.layer for s in report.layers]
    ax.plot(layers, [s.max_norm for s in report.layers], "o-", label="max patch")
    ax.plot(layers, [s.p99_norm for s in report.layers], "^-", label="99th pct patch")
    ax.plot(layers, [s.median_norm for s in report.layers], "s-", label="median patch")
    if report.layers[0].cls_norm is not None:
        ax.plot(layers, [s.cls_norm for s in report.layers], "d--", label="CLS")
    if report.num_registers:
        ax.plot(layers, [max(s.register_norms) for s in report.layers], "x--", label="max register")
    ax.set_yscale("log")
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("token norm")
    ax.legend(fontsize=7)
    return fig


def boxes_figure(
    images: Sequence[np.ndarray],
    boxes: dict[str, Sequence[Sequence[float]]],
    ground_truth: Sequence[Sequence[float]] | None = None,
    *,
    max_images: int = 6,
) -> Figure:
    """Object boxes (e.g. from :func:`register_adapter.discovery.discover_objects`) drawn on the images.

    Args:
        images: The images as the model saw them, (H, W, 3).
        boxes: Label -> one ``(x0, y0, x1, y1)`` box per image, in pixels of ``images``.
        ground_truth: One ground-truth box per image, drawn dashed in white.
        max_images: At most this many images.
    """
    from matplotlib.patches import Rectangle

    count = min(len(images), max_images)
    fig = Figure(figsize=(2.2 * count, 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, count))
    colors = ("tab:red", "tab:cyan", "tab:orange", "tab:green")
    for index, ax in enumerate(axes):
        ax.imshow(images[index])
        ax.set_axis_off()
        if ground_truth is not None:
            x0, y0, x1, y1 = ground_truth[index]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linestyle="--", lw=1.5))
        for color, (label, label_boxes) in zip(colors, boxes.items()):
            x0, y0, x1, y1 = label_boxes[index]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=2, label=label))
    axes[0].legend(loc="upper left", fontsize=7, bbox_to_anchor=(0.0, -0.02), ncol=1, frameon=False)
    return fig


def save_png(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG with the Agg backend; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=dpi)
    return path

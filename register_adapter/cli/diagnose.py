"""``register-adapter diagnose``: find artifact tokens in a model's residual stream and draw them.

    register-adapter diagnose --model facebook/dinov2-base photos/ --out diagnosis/
    register-adapter diagnose --model facebook/dinov2-base --adapter my-registers photos/ --out diagnosis/
    register-adapter diagnose --model planted:dinov2 photos/ --out diagnosis/      # no download needed

``--model`` also takes a built-in tiny model (``tiny-vit``, ...) or ``planted:<family>``, a model with planted
artifacts (:func:`register_adapter.testing.make_artifact_model`, 224 px images, 8 px patches) to try the command
offline. Writes ``report.json`` (``{"model", "adapter", "base", "with_adapter"}``, each report as
:meth:`~register_adapter.ArtifactReport.to_dict` gives it), ``norm_histograms.png``, ``norm_scale.png``,
one panel per image under ``panels/`` (at most ``--max-panels``) and, with ``--adapter``, the same for the adapted
model plus ``before_after.png``. Bad input ends the run with exit status 2 and one ``error:`` line on stderr, before
any model is loaded where it can be known then (options, unreadable images, an ``--out`` that cannot be created) and
before ``--out`` is created otherwise (a model or adapter that cannot be loaded, a ``--layer`` the model lacks).
Also runs as ``python -m register_adapter.cli diagnose``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..architectures import find_vision_tower
from ..diagnostics.artifacts import ArtifactReport, check_layer, find_artifacts
from ..diagnostics.viz import (
    artifact_panel,
    before_after,
    display_image,
    norm_histograms,
    norm_scale_figure,
    patch_views,
    save_png,
)
from ..errors import InvalidConfigError
from ..loading import first_line, load_model
from ..pixels import as_pixel_values
from ..sources import find_image_files
from .options import check_out, layer, non_negative, positive, report_errors, threshold

BEFORE_AFTER_IMAGES = 4  # image rows of before_after.png


def _write_pictures(
    model: nn.Module,
    report: ArtifactReport,
    shown: list[Path],
    pixel_values: torch.Tensor | None,
    images: list[np.ndarray],
    out: Path,
    suffix: str,
) -> list[Path]:
    """Histograms, norm scales and one panel per image of ``shown``: ``pixel_values`` and ``images`` (as drawn)
    hold those images first."""
    written = [
        save_png(norm_histograms(report), out / f"norm_histograms{suffix}.png"),
        save_png(norm_scale_figure(report), out / f"norm_scale{suffix}.png"),
    ]
    if shown:
        views = patch_views(model, pixel_values[: len(shown)])
        for index, path in enumerate(shown):
            panel = artifact_panel(report.images[index], views, index, image=images[index], threshold=report.threshold)
            written.append(save_png(panel, out / "panels" / f"{index:03d}_{path.stem}{suffix}.png"))
    return written


def run(args: argparse.Namespace) -> list[Path]:
    """Diagnose, write report.json and the pictures; returns the written files."""
    paths = find_image_files(args.images, check=True)
    out = Path(args.out)
    check_out(out)
    model, processor = load_model(args.model, adapter=args.adapter)
    model = model.to(args.device).eval()
    tower = find_vision_tower(model)
    check_layer(args.layer, len(tower.blocks))
    options = {
        "layer": args.layer,
        "threshold": args.threshold,
        "processor": processor,
        "batch_size": args.batch_size,
        "progress": True,
        "sources": [str(p) for p in paths],
    }
    reports: dict[str, ArtifactReport] = {}
    if args.adapter is None:
        reports["base"] = find_artifacts(model, paths, **options)
    else:
        with model.disable_adapter():
            reports["base"] = find_artifacts(model, paths, **options)
        reports["with_adapter"] = find_artifacts(model, paths, **options)
    document = {"model": args.model, "adapter": args.adapter, **{k: r.to_dict() for k, r in reports.items()}}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidConfigError(f"Cannot write to --out '{out}': {first_line(error)}") from error
    report_path = out / "report.json"
    report_path.write_text(json.dumps(document, indent=1) + "\n")
    written = [report_path]
    # The images in panels and in before_after.png are read once, for every picture of both models.
    read = paths[: max(args.max_panels, BEFORE_AFTER_IMAGES if args.adapter is not None else 0)]
    pixel_values = as_pixel_values(read, tower, processor) if read else None  # (n, 3, H, W)
    images = [display_image(values, processor) for values in pixel_values] if read else []
    shown = paths[: args.max_panels]
    if args.adapter is None:
        written += _write_pictures(model, reports["base"], shown, pixel_values, images, out, "")
    else:
        with model.disable_adapter():
            written += _write_pictures(model, reports["base"], shown, pixel_values, images, out, "")
        written += _write_pictures(model, reports["with_adapter"], shown, pixel_values, images, out, "_adapter")
        figure = before_after(reports["base"], reports["with_adapter"], images, max_images=BEFORE_AFTER_IMAGES)
        written.append(save_png(figure, out / "before_after.png"))
    for name, report in reports.items():
        sys.stdout.write(_summary(name, report) + "\n")
    sys.stdout.write(f"wrote {report_path} and {len(written) - 1} PNG files under {out}\n")
    return written


def _summary(name: str, report: ArtifactReport) -> str:
    first = "never" if report.first_outlier_layer is None else f"from layer {report.first_outlier_layer} on"
    threshold = "no threshold: one mode" if report.threshold is None else f"threshold {report.threshold:.4g}"
    return (
        f"{name}: {len(report.images)} images, {100 * report.outlier_fraction:.2f}% outlier tokens at layer "
        f"{report.layer} ({threshold}, {report.threshold_method}); outliers {first}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="register-adapter diagnose",
        description="Find artifact (high-norm outlier) tokens in a vision transformer and draw them.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument(
        "--model",
        required=True,
        help="model path or Hub id, a built-in tiny model (tiny-vit, ...), or planted:<family> for a model with "
        "planted artifacts (vit, deit, dinov2, dinov2-with-registers, clip-vision, clip, siglip, ijepa)",
    )
    parser.add_argument("--adapter", help="register adapter (path or Hub id) to compare against the base model")
    parser.add_argument("--out", required=True, help="output folder for report.json and the PNG files")
    parser.add_argument(
        "--layer",
        type=layer,
        default=None,
        help="layer of the per-image maps (1 = first block output, -1 = last; default: last)",
    )
    parser.add_argument(
        "--threshold",
        type=threshold,
        default="auto",
        help="'auto' (bimodal split, default), a number, or 'mean+<k>std' such as 'mean+3std'",
    )
    parser.add_argument("--batch-size", type=positive, default=8, help="images per forward pass (default 8)")
    parser.add_argument(
        "--max-panels",
        type=non_negative,
        default=8,
        help="draw a panel for at most this many images (default 8)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``register-adapter diagnose``: returns an exit status (2 for bad input)."""
    return report_errors("diagnose", run, parse_args(argv))

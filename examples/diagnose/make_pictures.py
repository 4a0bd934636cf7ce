"""Make the pictures of the diagnostics section: a DINOv2-like model with planted artifacts, on synthetic scenes and
on real photos, against its oracle (the same model with the planted write removed).

    python examples/diagnose/make_pictures.py --out docs/images                   # photo: scikit-image's rocket
    python examples/diagnose/make_pictures.py --photos my/photo.jpg --out pictures

Writes (all PNG):

    diagnose_panel_photo.png      image | norm map | outliers | CLS attention | PCA, for the first photo
    diagnose_histograms.png       patch-norm histograms per layer (scenes and photos together)
    diagnose_before_after.png     planted model vs oracle on four scenes
    diagnose_lost.png             LOST boxes with and without artifacts, ground truth dashed

and prints detection precision / recall against the planted ground truth and LOST CorLoc with and without artifacts.
Nothing is downloaded; about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from register_adapter.diagnostics import find_artifacts
from register_adapter.diagnostics.discovery import discover_objects
from register_adapter.diagnostics.viz import (
    artifact_panel,
    before_after,
    boxes_figure,
    display_image,
    norm_histograms,
    patch_views,
    save_png,
)
from register_adapter.images import load_image
from register_adapter.loading import PLANTED_SIZES
from register_adapter.metrics import corloc
from register_adapter.testing import make_artifact_model, make_object_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--photos", nargs="*", help="real photos to diagnose, the first gets a panel (default: scikit-image's rocket)"
    )
    parser.add_argument("--out", default="docs/images", help="output folder")
    parser.add_argument("--scenes", type=int, default=16, help="number of synthetic scenes")
    args = parser.parse_args()
    out = Path(args.out)

    planted = make_artifact_model("dinov2", **PLANTED_SIZES)
    scene = make_object_images(args.scenes, planted.image_size, seed=0)
    if args.photos is None:
        import skimage.data

        photos, names = [Image.fromarray(skimage.data.rocket())], ["rocket (scikit-image)"]
    else:
        photos, names = [load_image(path) for path in args.photos], [Path(path).name for path in args.photos]
    pixel_values = planted.preprocess([*scene.images, *photos])
    images = [display_image(p, planted.processor) for p in pixel_values]
    sources = [f"scene {i}" for i in range(args.scenes)] + names

    report = find_artifacts(planted.model, pixel_values, sources=sources)
    oracle = find_artifacts(planted.oracle, pixel_values, sources=sources)
    truth = planted.artifact_mask(pixel_values).numpy()
    found = np.stack([image.outlier_mask for image in report.images])
    precision, recall = (found & truth).sum() / found.sum(), (found & truth).sum() / truth.sum()
    print(
        f"artifacts: {100 * report.outlier_fraction:.2f}% of patch tokens from layer {report.first_outlier_layer} "
        f"on (planted at layer {planted.layer}); threshold {report.threshold:.1f} ({report.threshold_note})"
    )
    print(f"detection against the planted ground truth: precision {precision:.3f}, recall {recall:.3f}")
    print(f"oracle: {100 * oracle.outlier_fraction:.2f}% outlier tokens")

    if photos:
        index = args.scenes  # the first photo
        views = patch_views(planted.model, pixel_values[index : index + 1])
        panel = artifact_panel(report.images[index], views, 0, image=images[index], threshold=report.threshold)
        save_png(panel, out / "diagnose_panel_photo.png", dpi=80)
    save_png(norm_histograms(report), out / "diagnose_histograms.png", dpi=80)
    save_png(
        before_after(report, oracle, images, labels=("planted", "oracle")), out / "diagnose_before_after.png", dpi=70
    )

    scene_values = pixel_values[: args.scenes]
    boxes = {
        "with artifacts": discover_objects(planted.model, scene_values, features="keys"),
        "oracle": discover_objects(planted.oracle, scene_values, features="keys"),
    }
    for label, label_boxes in boxes.items():
        print(f"LOST CorLoc ({label}, keys): {corloc(label_boxes, scene.boxes[:, None]):.3f} on {args.scenes} scenes")
    save_png(boxes_figure(images[: args.scenes], boxes, scene.boxes), out / "diagnose_lost.png", dpi=80)
    for path in sorted(out.glob("diagnose_*.png")):
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

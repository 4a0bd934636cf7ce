"""Detection precision/recall on 8 planted families and LOST CorLoc (keys) with artifacts / on the oracle, 64 scenes
at 32 px: the numbers in docs/diagnostics.md. With ``--photos``, also the ground truth on real photos: the fraction
of artifact tokens, their norm over the median patch norm at the last layer, and detection precision/recall. About
20 s on a 2-core CPU (25 s with 62 photos); nothing is downloaded.

    python examples/diagnose/measure_planted.py
    python examples/diagnose/measure_planted.py --photos my_photos/
"""

import argparse

import numpy as np
import torch

from register_adapter import corloc, discover_objects, find_artifacts
from register_adapter.images import load_image
from register_adapter.sources import find_image_files
from register_adapter.testing import make_artifact_model, make_object_images

FAMILIES = ["vit", "deit", "dinov2", "dinov2-with-registers", "clip-vision", "clip", "siglip", "ijepa"]
LOST_FAMILIES = ("vit", "dinov2", "clip-vision", "siglip")


def precision_recall(report, truth: np.ndarray) -> tuple[float, float]:
    predicted = np.stack([image.outlier_mask for image in report.images])
    hits = (predicted & truth).sum()
    return hits / max(predicted.sum(), 1), hits / max(truth.sum(), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="*", default=[], help="photo files or folders (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = [load_image(path) for path in find_image_files(args.photos, check=True)] if args.photos else []
    for family in FAMILIES:
        planted = make_artifact_model(family)
        scene = make_object_images(64, planted.image_size, seed=0)
        pixel_values = planted.preprocess(scene.images)
        report = find_artifacts(planted.model, pixel_values)
        precision, recall = precision_recall(report, planted.artifact_mask(pixel_values).numpy())
        line = (
            f"{family}: precision {precision:.3f}, recall {recall:.3f}, "
            f"first outlier layer {report.first_outlier_layer} (planted {planted.layer})"
        )
        if family in LOST_FAMILIES:
            boxes = scene.boxes[:, None]  # one ground-truth box per image
            with_artifacts = corloc(discover_objects(planted.model, pixel_values, features="keys"), boxes)
            oracle = corloc(discover_objects(planted.oracle, pixel_values, features="keys"), boxes)
            line += f", LOST CorLoc keys {with_artifacts:.2f} / oracle {oracle:.2f}"
        print(line)
        if photos:
            pixel_values = planted.preprocess(photos)
            truth = planted.artifact_mask(pixel_values).numpy()  # (B, h, w)
            report = find_artifacts(planted.model, pixel_values)
            last = report.patch_norms[-1]  # (B, N)
            ratio = last[truth.reshape(len(truth), -1)] / np.median(last)
            precision, recall = precision_recall(report, truth)
            print(
                f"  {len(photos)} photos: ground truth {100 * truth.mean():.2f}% of patch tokens at "
                f"{ratio.min():.1f}-{ratio.max():.1f}x the median norm (median {np.median(ratio):.1f}x); "
                f"precision {precision:.3f}, recall {recall:.3f}"
            )


if __name__ == "__main__":
    main()

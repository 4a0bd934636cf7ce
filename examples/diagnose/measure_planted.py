"""Detection precision/recall on 8 planted families and LOST CorLoc (keys) with artifacts / on the oracle, 64 scenes
at 32 px: the numbers in docs/diagnostics.md. About 2 minutes on a 2-core CPU; nothing is downloaded.

    python examples/diagnose/measure_planted.py
"""

import numpy as np
import torch

from register_adapter import corloc, discover_objects, find_artifacts
from register_adapter.testing import make_artifact_model, make_object_images

FAMILIES = ["vit", "deit", "dinov2", "dinov2-with-registers", "clip-vision", "clip", "siglip", "ijepa"]
LOST_FAMILIES = ("vit", "dinov2", "clip-vision", "siglip")


def main() -> None:
    torch.set_num_threads(1)
    for family in FAMILIES:
        planted = make_artifact_model(family)
        scene = make_object_images(64, planted.image_size, seed=0)
        pixel_values = planted.preprocess(scene.images)
        truth = planted.artifact_mask(pixel_values).numpy()
        report = find_artifacts(planted.model, pixel_values)
        predicted = np.stack([image.outlier_mask for image in report.images])
        hits = (predicted & truth).sum()
        line = (
            f"{family}: precision {hits / max(predicted.sum(), 1):.3f}, recall {hits / truth.sum():.3f}, "
            f"first outlier layer {report.first_outlier_layer} (planted {planted.layer})"
        )
        if family in LOST_FAMILIES:
            boxes = scene.boxes[:, None]  # one ground-truth box per image
            with_artifacts = corloc(discover_objects(planted.model, pixel_values, features="keys"), boxes)
            oracle = corloc(discover_objects(planted.oracle, pixel_values, features="keys"), boxes)
            line += f", LOST CorLoc keys {with_artifacts:.2f} / oracle {oracle:.2f}"
        print(line)


if __name__ == "__main__":
    main()

"""Test-time registers on the 8 planted families: the numbers in docs/test_time_registers.md.

For each family: ``find_register_neurons`` on 64 scenes with every setting automatic (where the planted neurons
rank, the chosen settings); then, on 64 other scenes, ``add_test_time_registers`` with what it found: the outlier
fraction of the patch tokens at the last block output before and after (at the base model's threshold), the norm of
the test-time register over the median patch norm, the cosine of the CLS output to the base model's, the smallest
cosine of a patch output to the artifact-free oracle's where the base model had no artifact, and LOST CorLoc (keys)
with artifacts, with the test-time register and on the oracle. With ``--photos``, the neurons are found on photos
instead and the outlier fractions measured on them. About 40 s on a 2-core CPU; nothing is downloaded.

    python examples/test_time/measure_planted.py
    python examples/test_time/measure_planted.py --photos my_photos/
"""

import argparse
import copy

import torch

from register_adapter import add_test_time_registers, corloc, discover_objects, find_artifacts, find_register_neurons
from register_adapter.architectures import find_vision_tower
from register_adapter.images import load_image
from register_adapter.sources import find_image_files
from register_adapter.testing import make_artifact_model, make_object_images

FAMILIES = ["vit", "deit", "dinov2", "dinov2-with-registers", "clip-vision", "clip", "siglip", "ijepa"]
LOST_FAMILIES = ("vit", "dinov2", "clip-vision", "siglip")


def outputs(model, pixel_values):
    with torch.no_grad():
        return find_vision_tower(model).module(pixel_values=pixel_values).last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="*", default=[], help="photo files or folders (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = [load_image(path) for path in find_image_files(args.photos, check=True)] if args.photos else []
    cosine = torch.nn.functional.cosine_similarity
    for family in FAMILIES:
        planted = make_artifact_model(family)
        planted_neurons = {(layer - 1, unit) for layer, unit in planted.neurons}
        search = planted.preprocess(photos) if photos else planted.preprocess(make_object_images(64, 32).images)
        found = find_register_neurons(planted.model, search, progress=False)
        ranks = sorted(i for i, (b, u, _) in enumerate(found.ranking(50)) if (b, u) in planted_neurons)
        model = add_test_time_registers(copy.deepcopy(planted.model), found)
        scene = make_object_images(64, planted.image_size, seed=1)
        pixel_values = search if photos else planted.preprocess(scene.images)
        threshold = found.threshold.value
        before = find_artifacts(planted.model, pixel_values, threshold=threshold)
        after = find_artifacts(model, pixel_values, threshold=threshold)
        native = find_vision_tower(model).num_native_registers
        register = after.layers[-1].register_norms[native] / after.layers[-1].median_norm
        base, ours, oracle = (outputs(m, pixel_values) for m in (planted.model, model, planted.oracle))
        clean = ~planted.artifact_mask(pixel_values).flatten(1)  # (B, N)
        n = clean.shape[1]
        patch_cosine = cosine(ours[:, -n:][clean], oracle[:, -n:][clean], dim=-1).min()
        line = (
            f"{family}: planted neurons ranked {[r + 1 for r in ranks]}, top_k {found.top_k}, top_layer "
            f"{found.top_layer}, outlier_layer {found.outlier_layer}; outliers {100 * before.outlier_fraction:.2f} % "
            f"-> {100 * after.outlier_fraction:.2f} %, register {register:.1f}x median; cosine to base CLS "
        )
        line += (
            f"{cosine(ours[:, 0], base[:, 0], dim=-1).min():.5f}"
            if planted.model.config.model_type
            not in (
                "siglip_vision_model",
                "ijepa",
            )
            else "(no CLS)"
        )
        line += f", to oracle patches {patch_cosine:.4f}"
        if family in LOST_FAMILIES and not photos:
            boxes = scene.boxes[:, None]
            scores = [
                corloc(discover_objects(m, pixel_values, features="keys"), boxes)
                for m in (planted.model, model, planted.oracle)
            ]
            line += ", LOST CorLoc keys {:.2f} / test-time {:.2f} / oracle {:.2f}".format(*scores)
        print(line)


if __name__ == "__main__":
    main()

"""LOST object discovery and CorLoc: exact on hand-made features, CorLoc on synthetic scenes with known boxes, and
artifacts breaking LOST as in Darcet et al. (Table 3)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from testing_common import planted_model
from transformers import CLIPImageProcessorPil, ViTImageProcessorPil
from transformers.image_utils import PILImageResampling

from register_adapter import add_registers
from register_adapter.diagnostics.discovery import discover_objects, lost
from register_adapter.errors import InvalidConfigError
from register_adapter.metrics import box_iou, corloc
from register_adapter.testing import make_object_images


@pytest.fixture(scope="module")
def scene():
    return make_object_images(16, 32, seed=21)


def test_lost_on_hand_made_features():
    # Background features point one way, those of a 3 x 2 object the other.
    features = torch.zeros(6, 8, 3)
    features[..., 0] = -1.0
    features[2:5, 3:5] = torch.tensor([1.0, 0.5, 0.0])
    features[3, 4] = torch.tensor([1.0, -1.0, 0.0])
    result = lost(features.reshape(48, 3), (6, 8), k_patches=10)
    assert result.seed == (2, 3)  # object patches have the fewest positive correlations (6 vs 42)
    assert result.box == (3, 2, 5, 5)
    assert result.mask.sum() == 6 and result.mask[2:5, 3:5].all()
    # A token correlated with nothing (an artifact) becomes the seed, and LOST returns it alone.
    features[0, 7] = torch.tensor([0.0, 0.0, 1.0])
    result = lost(features.reshape(48, 3), (6, 8), k_patches=10)
    assert result.seed == (0, 7) and result.box == (7, 0, 8, 1)


def test_lost_keeps_only_the_seed_component():
    features = torch.full((5, 9, 2), -1.0)
    features[1:3, 1:3] = torch.tensor([1.0, 0.0])  # 4 patches
    features[1:4, 5:8] = torch.tensor([1.0, 0.1])  # 9 patches: more positive correlations than the small blob
    result = lost(features.reshape(45, 2), (5, 9), k_patches=4)
    assert result.box == (1, 1, 3, 3)


def test_box_iou_and_corloc_numbers():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    predicted = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    truth = [[(0, 0, 10, 9)], [(20, 20, 30, 30), (0, 0, 14, 10)], [(5, 0, 15, 10)]]
    assert corloc(predicted, truth) == pytest.approx(2 / 3)  # IoU 0.9, max(0, 0.71), 0.33
    assert corloc(predicted, truth, iou_threshold=0.3) == 1.0
    with pytest.raises(
        InvalidConfigError, match=r"^corloc needs one predicted box per image: got 3 predictions for 2 images\.$"
    ):
        corloc(predicted, truth[:2])


def test_corloc_refuses_one_box_per_image_where_a_list_of_boxes_is_due():
    with pytest.raises(InvalidConfigError) as raised:
        corloc([(0, 0, 10, 10)], [(0, 0, 10, 10)])
    assert str(raised.value) == (
        "corloc: ground truth 0 is (0, 0, 10, 10), not a list of boxes (x0, y0, x1, y1): give each image a list of its "
        "boxes, e.g. [[box]] for one image with one box."
    )
    with pytest.raises(InvalidConfigError, match=r"^corloc: prediction 0 is 7, not a box \(x0, y0, x1, y1\): give "):
        corloc([7], [[(0, 0, 10, 10)]])
    assert corloc([(0, 0, 10, 10), (0, 0, 10, 10)], [[(0, 0, 10, 9)], []]) == 0.5  # no box: a miss


@pytest.mark.parametrize("family", ["dinov2", "clip-vision"])
def test_corloc_on_synthetic_scenes_and_artifacts_break_lost(family, scene):
    planted = planted_model(family)
    pixel_values = planted.preprocess(scene.images)
    truth = scene.boxes[:, None]  # one box per image
    oracle = {f: corloc(discover_objects(planted.oracle, pixel_values, features=f), truth) for f in ("keys", "tokens")}
    with_artifacts = corloc(discover_objects(planted.model, pixel_values, features="tokens"), truth)
    assert oracle["keys"] >= 0.85 and oracle["tokens"] >= 0.95
    assert with_artifacts <= 0.2  # the seed lands on an artifact token


def test_registers_are_skipped_and_images_give_the_boxes_of_their_pixel_values(scene):
    planted = planted_model("dinov2")
    pixel_values = planted.preprocess(scene.images[:6])
    boxes = discover_objects(planted.oracle, pixel_values)
    with_registers = discover_objects(add_registers(copy.deepcopy(planted.oracle), 4), pixel_values)
    assert with_registers == boxes  # registers initialised near zero change no feature sign
    from_arrays = discover_objects(planted.oracle, list(scene.images[:6]), processor=planted.processor, batch_size=4)
    assert from_arrays == boxes  # the images are the model's size: nothing to undo


def nearest(processor_class, **sizes):
    """A processor that resizes with nearest-neighbour sampling: a 2x downscale keeps a plain background plain."""
    return processor_class(resample=PILImageResampling.NEAREST, image_mean=[0.5] * 3, image_std=[0.5] * 3, **sizes)


def test_boxes_are_in_pixels_of_the_images_given():
    # 64 px scenes on a 32 px model: the processor halves them, the boxes come back in 64 px coordinates.
    planted = planted_model("dinov2")
    scene = make_object_images(16, 64, seed=3)
    processor = nearest(ViTImageProcessorPil, size={"height": 32, "width": 32})
    boxes = discover_objects(planted.oracle, list(scene.images), processor=processor, batch_size=5)
    assert corloc(boxes, scene.boxes[:, None]) >= 0.9
    pixel_values = processor(images=list(scene.images), return_tensors="pt")["pixel_values"]
    in_pixel_values = discover_objects(planted.oracle, pixel_values)  # in 32 px coordinates
    assert corloc(in_pixel_values, scene.boxes[:, None]) <= 0.1
    assert boxes == [tuple(2 * v for v in box) for box in in_pixel_values]


def test_boxes_undo_the_resize_and_the_centre_crop(tmp_path):
    # 64 x 96 images (the scene in the middle, plain margins) -> shortest edge 32 -> 32 x 48 -> centre crop 32 x 32,
    # 8 px cut off left and right: an input x maps to (x + 8) * 2 in the image.
    planted = planted_model("dinov2")
    scene = make_object_images(12, 64, seed=5)
    wide = np.empty((12, 64, 96, 3), dtype=np.uint8)
    for image, canvas in zip(scene.images, wide):
        canvas[:] = image[0, 0]
        canvas[:, 16:80] = image
    truth = scene.boxes + np.array([16, 0, 16, 0])
    processor = nearest(CLIPImageProcessorPil, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    paths = []
    for i, image in enumerate(wide):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    boxes = discover_objects(planted.oracle, paths, processor=processor)
    assert corloc(boxes, truth[:, None]) >= 0.9
    in_pixel_values = discover_objects(
        planted.oracle, processor(images=list(wide), return_tensors="pt")["pixel_values"]
    )
    assert boxes == [((x0 + 8) * 2, y0 * 2, (x1 + 8) * 2, y1 * 2) for x0, y0, x1, y1 in in_pixel_values]


@pytest.mark.parametrize("family", ["clip-vision", "vit"])
def test_pixel_values_at_another_resolution(family):
    # 48 px pixel values on a 32 px model: position embeddings interpolated, boxes in 48 px coordinates.
    planted = planted_model(family)
    scene = make_object_images(12, 48, seed=2)
    processor = nearest(ViTImageProcessorPil, size={"height": 48, "width": 48})
    pixel_values = processor(images=list(scene.images), return_tensors="pt")["pixel_values"]  # (12, 3, 48, 48)
    assert corloc(discover_objects(planted.oracle, pixel_values), scene.boxes[:, None]) >= 0.9


def test_unknown_features_are_refused():
    planted = planted_model("dinov2")
    with pytest.raises(
        InvalidConfigError, match=r"^features must be one of 'keys', 'values', 'tokens'; got 'queries'\.$"
    ):
        discover_objects(planted.oracle, torch.zeros(1, 3, 32, 32), features="queries")


def test_corloc_counts_any_ground_truth_box():
    boxes = np.array([[0, 0, 8, 8], [8, 8, 16, 16]])
    assert corloc([(8, 8, 16, 16)], [boxes]) == 1.0
    assert corloc([(0, 8, 8, 16)], [boxes]) == 0.0


@pytest.mark.gpu
def test_discover_objects_on_cuda(scene):
    planted = planted_model("dinov2")
    oracle = copy.deepcopy(planted.oracle).to("cuda")
    boxes = discover_objects(oracle, planted.preprocess(scene.images))  # features copied to the CPU once per batch
    assert corloc(boxes, scene.boxes[:, None]) >= 0.85

"""find_artifacts: detection against planted ground truth on every family, nothing on clean models, registers and
thresholds reported, JSON output, and clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from testing_common import ForwardCounter, hidden_patch_norms, hidden_state_norms, planted_model
from transformers import BitImageProcessorPil

from register_adapter import add_registers
from register_adapter.diagnostics import find_artifacts
from register_adapter.diagnostics.thresholds import bimodal_threshold, check_threshold, resolve_threshold
from register_adapter.diagnostics.viz import patch_views
from register_adapter.errors import DataError, InvalidConfigError, UnsupportedModelError
from register_adapter.testing import PLANTABLE_FAMILIES, make_artifact_model, make_object_images
from register_adapter.tiny import TINY_MODELS, build_tiny_model, tiny_image_size

# Families whose tiny model find_artifacts reads (BEiT/Data2VecVision are refused by the core; ViTMAE drops patches;
# SigLIP2 takes pre-patchified inputs).
CLEAN = sorted(set(TINY_MODELS) - {"tiny-beit", "tiny-data2vec-vision", "tiny-vit-mae", "tiny-siglip2"})


@pytest.fixture(scope="module")
def scene():
    return make_object_images(12, 32, seed=11)


def precision_recall(report, truth):
    predicted = np.stack([image.outlier_mask for image in report.images])
    hits = (predicted & truth).sum()
    return hits / max(predicted.sum(), 1), hits / truth.sum()


@pytest.mark.parametrize("family", PLANTABLE_FAMILIES)
def test_detects_planted_artifacts(family, scene):
    planted = planted_model(family)
    pixel_values = planted.preprocess(scene.images)
    truth = planted.artifact_mask(pixel_values).numpy()  # (B, h, w)
    report = find_artifacts(planted.model, pixel_values)
    precision, recall = precision_recall(report, truth)
    assert precision >= 0.95 and recall >= 0.95
    assert report.first_outlier_layer == planted.layer
    assert [s.outlier_fraction > 0 for s in report.layers] == [layer >= planted.layer for layer in range(1, 7)]
    assert report.layer == 6 and report.grid == (16, 16) and report.threshold_method == "bimodal"
    assert [image.outlier_positions for image in report.images] == planted.artifact_positions(pixel_values)
    assert report.outlier_fraction == pytest.approx(truth.mean())
    norms = hidden_patch_norms(planted.model, pixel_values, 16 * 16)[-1].numpy().reshape(truth.shape)  # (B, h, w)
    last = report.layers[-1]
    assert last.max_norm == pytest.approx(norms.max(), rel=1e-5)
    assert last.median_norm == pytest.approx(np.median(norms), rel=1e-5)
    assert last.max_norm / last.median_norm > 10
    assert norms[~truth].max() < report.threshold < norms[truth].min()


@pytest.mark.parametrize("family", ["dinov2", "clip-vision"])
def test_oracle_has_no_artifacts(family, scene):
    planted = planted_model(family)
    report = find_artifacts(planted.oracle, planted.preprocess(scene.images))
    assert report.first_outlier_layer is None and report.threshold is None
    assert report.threshold_note == "one mode: no token norm stands apart from the others"


@pytest.mark.parametrize("name", CLEAN)
def test_clean_random_models_have_no_outliers(name):
    size = tiny_image_size(name)
    pixel_values = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    report = find_artifacts(build_tiny_model(name), pixel_values)
    assert report.first_outlier_layer is None
    assert all(s.threshold is None and s.outlier_fraction == 0 for s in report.layers)
    assert all(image.outlier_positions == [] for image in report.images)


def test_mean_plus_k_std_flags_the_tail_of_a_clean_model():
    pixel_values = torch.rand(6, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    model = build_tiny_model("tiny-vit")
    report = find_artifacts(model, pixel_values, threshold="mean+3std")
    norms = hidden_patch_norms(model, pixel_values, 15 * 15)[-1].numpy()  # (B, N), from the model itself
    assert report.threshold == pytest.approx(norms.mean() + 3 * norms.std(), rel=1e-6)
    assert report.threshold_method == "mean+3std"
    assert report.outlier_fraction == pytest.approx((norms > report.threshold).mean())
    assert 0 < report.outlier_fraction < 0.02


def test_mean_plus_k_std_on_clean_models_flags_at_most_a_small_tail():
    # What the docs claim: 0-0.4 % of the patch tokens per layer, and not always some.
    fractions = {}
    for name in CLEAN:
        size = tiny_image_size(name)
        pixel_values = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(0))
        report = find_artifacts(build_tiny_model(name), pixel_values, threshold="mean+3std")
        fractions[name] = [s.outlier_fraction for s in report.layers]
    assert max(max(f) for f in fractions.values()) <= 0.004
    assert fractions["tiny-siglip"] == [0.0, 0.0] and min(fractions["tiny-vit"]) > 0


def test_fixed_threshold_and_layer(scene):
    planted = planted_model("dinov2")
    pixel_values = planted.preprocess(scene.images)
    before = find_artifacts(planted.model, pixel_values, layer=planted.layer - 1, threshold=50.0)
    assert before.layer == 2 and before.threshold == 50.0 and before.threshold_method == "fixed"
    assert before.outlier_fraction == 0
    at = find_artifacts(planted.model, pixel_values, layer=planted.layer, threshold=50.0)
    assert precision_recall(at, planted.artifact_mask(pixel_values).numpy()) == (1.0, 1.0)
    expected = hidden_patch_norms(planted.model, pixel_values, 16 * 16)[planted.layer - 1, 3].reshape(16, 16)
    np.testing.assert_allclose(at.images[3].norm_map, expected.numpy(), rtol=1e-5)
    last = find_artifacts(planted.model, pixel_values, layer=-1)
    assert last.layer == 6


def test_registers_are_reported_apart_from_patches(scene):
    planted = make_artifact_model("vit")
    pixel_values = planted.preprocess(scene.images)
    truth = planted.artifact_mask(pixel_values).numpy()
    model = add_registers(planted.model, num_register_tokens=4)
    report = find_artifacts(model, pixel_values)
    assert report.num_registers == 4 and report.grid == (16, 16)
    assert all(len(image.register_norms) == 4 for image in report.images)
    assert all(len(s.register_norms) == 4 for s in report.layers)
    precision, recall = precision_recall(report, truth)
    assert precision >= 0.95 and recall >= 0.95
    with model.disable_adapter():
        base = find_artifacts(model, pixel_values)
    assert base.num_registers == 0 and base.images[0].register_norms == []
    assert precision_recall(base, truth) == (1.0, 1.0)


def test_native_registers_and_cls_norms(scene):
    planted = planted_model("dinov2-with-registers")
    pixel_values = planted.preprocess(scene.images)
    report = find_artifacts(planted.model, pixel_values)
    assert report.num_registers == 2
    last = hidden_state_norms(planted.model, pixel_values)[-1].numpy()  # (B, S): [CLS, REG, REG, PATCH...]
    np.testing.assert_allclose([image.cls_norm for image in report.images], last[:, 0], rtol=1e-5)
    np.testing.assert_allclose([image.register_norms for image in report.images], last[:, 1:3], rtol=1e-5)
    assert report.layers[-1].cls_norm == pytest.approx(last[:, 0].mean(), rel=1e-5)
    np.testing.assert_allclose(report.layers[-1].register_norms, last[:, 1:3].mean(0), rtol=1e-5)
    no_cls = find_artifacts(planted_model("siglip").model, planted_model("siglip").preprocess(scene.images))
    assert no_cls.images[0].cls_norm is None and no_cls.layers[0].cls_norm is None


def test_images_paths_and_pixel_values_give_the_same_report(scene, tmp_path):
    planted = planted_model("vit")
    paths = []
    for i, image in enumerate(scene.images[:3]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    from_tensor = find_artifacts(planted.model, planted.preprocess(scene.images[:3]))
    from_arrays = find_artifacts(planted.model, list(scene.images[:3]), processor=planted.processor)
    from_files = find_artifacts(planted.model, paths, processor=planted.processor, batch_size=2)
    for report in (from_arrays, from_files):
        assert [i.outlier_positions for i in report.images] == [i.outlier_positions for i in from_tensor.images]
        assert np.allclose(report.patch_norms, from_tensor.patch_norms, rtol=1e-4)


def test_report_to_json(scene, tmp_path):
    planted = planted_model("deit")
    pixel_values = planted.preprocess(scene.images[:4])
    report = find_artifacts(planted.model, pixel_values, sources=["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    text = report.to_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == json.loads(text)
    assert data["first_outlier_layer"] == planted.layer and data["layer"] == 6 and data["num_registers"] == 0
    assert data["threshold"] == pytest.approx(report.threshold, rel=1e-3)
    assert [image["source"] for image in data["images"]] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    image = data["images"][1]
    assert np.array(image["norm_map"]).shape == (16, 16)
    assert [tuple(p) for p in image["outlier_positions"]] == report.images[1].outlier_positions
    assert image["num_outliers"] == len(report.images[1].outlier_positions)
    assert [layer["layer"] for layer in data["layers"]] == [1, 2, 3, 4, 5, 6]
    assert set(data["layers"][0]) == {
        "layer",
        "max_norm",
        "median_norm",
        "p99_norm",
        "threshold",
        "outlier_fraction",
        "cls_norm",
        "register_norms",
    }
    assert "patch_norms" not in data


def test_bimodal_threshold_finds_a_small_second_mode():
    rng = np.random.default_rng(0)
    bulk = np.exp(rng.normal(np.log(40.0), 0.25, size=980))
    artifacts = np.exp(rng.normal(np.log(400.0), 0.1, size=20))
    chosen = bimodal_threshold(np.concatenate([bulk, artifacts]))
    assert bulk.max() < chosen.value < artifacts.min()
    assert chosen.note == "valley of the log-norm histogram below a second mode at 9.8x the median norm"
    assert bimodal_threshold(bulk).value is None


def test_threshold_rules_are_validated():
    norms = np.ones(10)
    for rule in (150, 150.0, np.float32(150), np.int64(150), np.array(150.0), torch.tensor(150.0)):
        assert check_threshold(rule) == 150.0 and type(check_threshold(rule)) is float
        assert resolve_threshold(rule, norms).value == 150.0
    assert [check_threshold(rule) for rule in ("auto", "bimodal", "mean+2.5std")] == ["auto", "bimodal", "mean+2.5std"]
    for rule, shown in (("otsu", "'otsu'"), (True, "True"), (None, "None"), ("mean+std", "'mean+std'")):
        with pytest.raises(InvalidConfigError) as error:
            resolve_threshold(rule, norms)
        assert str(error.value) == (
            f"threshold must be a positive number, 'auto', 'bimodal' or 'mean+<k>std' (e.g. 'mean+3std'); got {shown}."
        )
    for rule, shown in (
        (-1, "-1"),
        (0.0, "0"),
        (float("inf"), "inf"),
        (float("nan"), "nan"),
        (np.float32("inf"), "inf"),
    ):
        with pytest.raises(InvalidConfigError) as error:
            check_threshold(rule)
        assert str(error.value) == f"A fixed threshold must be a positive, finite number; got {shown}."


def test_fixed_threshold_of_any_real_type(scene):
    planted = planted_model("dinov2")
    pixel_values = planted.preprocess(scene.images[:4])
    reports = [
        find_artifacts(planted.model, pixel_values, threshold=t) for t in (50, np.float32(50), torch.tensor(50.0))
    ]
    assert [r.threshold for r in reports] == [50.0, 50.0, 50.0]
    assert json.loads(reports[2].to_json())["threshold"] == 50.0
    assert reports[1].images[0].outlier_positions == reports[0].images[0].outlier_positions


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"threshold": "otsu"},
            "threshold must be a positive number, 'auto', 'bimodal' or 'mean+<k>std' (e.g. 'mean+3std'); got 'otsu'.",
        ),
        ({"threshold": float("inf")}, "A fixed threshold must be a positive, finite number; got inf."),
        ({"threshold": float("nan")}, "A fixed threshold must be a positive, finite number; got nan."),
        ({"layer": -3}, "layer must be a whole number in [1, 2], or in [-2, -1] counting from the end; got -3."),
        ({"layer": 0}, "layer must be a whole number in [1, 2], or in [-2, -1] counting from the end; got 0."),
        ({"layer": 2.5}, "layer must be a whole number in [1, 2], or in [-2, -1] counting from the end; got 2.5."),
        ({"layer": True}, "layer must be a whole number in [1, 2], or in [-2, -1] counting from the end; got True."),
        ({"layer": "1"}, "layer must be a whole number in [1, 2], or in [-2, -1] counting from the end; got '1'."),
    ],
)
def test_bad_options_are_refused_before_any_forward_pass(options, message):
    model = build_tiny_model("tiny-vit")
    with ForwardCounter(model) as counter, pytest.raises(InvalidConfigError) as error:
        find_artifacts(model, torch.zeros(2, 3, 30, 30), **options)
    assert str(error.value) == message
    assert counter.calls == 0
    with ForwardCounter(model) as counter:
        find_artifacts(model, torch.zeros(2, 3, 30, 30), batch_size=1)
    assert counter.calls == 2  # the counter sees forward passes


def test_layer_counts_from_the_end_and_takes_integer_types():
    planted = planted_model("vit")
    pixel_values = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert [find_artifacts(planted.model, pixel_values, layer=v).layer for v in (-6, -1, np.int64(2))] == [1, 6, 2]
    assert find_artifacts(planted.model, pixel_values, layer=torch.tensor(-2)).layer == 5
    with pytest.raises(InvalidConfigError) as error:
        find_artifacts(planted.model, pixel_values, layer=-7)
    assert str(error.value) == (
        "layer must be a whole number in [1, 6], or in [-6, -1] counting from the end; got -7."
    )


def test_input_errors(tmp_path):
    model = build_tiny_model("tiny-vit")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"^Cannot read image '{broken}': not an image file that PIL can decode\\.$"):
        find_artifacts(model, [broken])
    with pytest.raises(DataError, match=f"^Image file '{tmp_path / 'missing.png'}' does not exist\\.$"):
        find_artifacts(model, [tmp_path / "missing.png"])
    with pytest.raises(DataError, match=r"^No images given\.$"):
        find_artifacts(model, [])
    with pytest.raises(
        DataError, match=r"^Expected pixel values of shape \(batch, 3, height, width\); got \(2, 1, 30, 30\)\.$"
    ):
        find_artifacts(model, torch.zeros(2, 1, 30, 30))
    with pytest.raises(
        InvalidConfigError,
        match=r"^layer must be a whole number in \[1, 2\], or in \[-2, -1\] counting from the end; got 3\.$",
    ):
        find_artifacts(model, torch.zeros(1, 3, 30, 30), layer=3)


def _image(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_images_of_different_sizes_are_refused():
    # A processor that keeps the aspect ratio: 60x30 and 30x60 images give 60x30 and 30x60 pixel values.
    model = build_tiny_model("tiny-vit")
    processor = BitImageProcessorPil(size={"shortest_edge": 30}, do_center_crop=False)
    tall, wide, short = _image(60, 30, 0), _image(30, 60, 1), _image(40, 30, 2)
    cases = [([tall, wide], 1, 1, "30x60"), ([tall, short], 1, 1, "40x30"), ([tall, tall, wide], 2, 2, "30x60")]
    cases += [([tall, wide], 2, 1, "30x60")]  # inside one batch
    for images, batch_size, index, size in cases:
        with pytest.raises(DataError) as error:
            find_artifacts(model, images, processor=processor, batch_size=batch_size)
        assert str(error.value) == (
            f"Images must all have one size after preprocessing: image {index} is {size} pixels (height x width), "
            "image 0 is 60x30. Resize or crop them to one size first, or pass a processor with a fixed output size, "
            "e.g. size={'height': 60, 'width': 30} or do_center_crop=True."
        )


def test_images_of_one_size_other_than_the_models():
    # 60x30 pixel values on a 30 px ViT: a 30 x 15 grid, position embeddings interpolated.
    model = build_tiny_model("tiny-vit")
    processor = BitImageProcessorPil(size={"shortest_edge": 30}, do_center_crop=False)
    images = [_image(60, 30, 0), _image(120, 60, 1), _image(60, 30, 2)]
    report = find_artifacts(model, images, processor=processor, batch_size=2)
    assert report.grid == (30, 15) and report.images[1].norm_map.shape == (30, 15)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]  # (3, 3, 60, 30)
    expected = hidden_patch_norms(model, pixel_values, 30 * 15, interpolate_pos_encoding=True)[-1].reshape(3, 30, 15)
    np.testing.assert_allclose(np.stack([i.norm_map for i in report.images]), expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-clip", "tiny-siglip"])
def test_pixel_values_at_another_resolution(name):
    model = build_tiny_model(name)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    report = find_artifacts(model, pixel_values)
    assert report.grid == (32, 32)
    expected = hidden_patch_norms(model, pixel_values, 32 * 32, interpolate_pos_encoding=True)  # (L, B, N)
    np.testing.assert_allclose(report.patch_norms, expected.numpy(), rtol=1e-5)


def test_models_that_cannot_interpolate_name_their_size():
    with pytest.raises(DataError) as error:
        find_artifacts(build_tiny_model("tiny-aimv2"), torch.rand(2, 3, 64, 64))
    assert str(error.value) == (
        "Aimv2VisionModel takes 30x30 pixel values (its image_size) and cannot interpolate its position embeddings "
        "to the 64x64 given. Resize the images to 30x30 (the default processor does) or pass a processor that does."
    )
    dinov2 = find_artifacts(build_tiny_model("tiny-dinov2"), torch.rand(1, 3, 64, 64))  # interpolates by itself
    assert dinov2.grid == (32, 32)


def test_in_memory_images_of_any_mode_are_converted_to_rgb():
    model = build_tiny_model("tiny-vit")
    gray = _image(30, 30, 0)[..., 0]  # (30, 30) uint8
    rgb = _image(30, 30, 1)

    def norms(images):
        return find_artifacts(model, images).patch_norms

    reference = norms([np.stack([gray] * 3, axis=-1)])
    np.testing.assert_allclose(norms([Image.fromarray(gray)]), reference)  # "L"
    np.testing.assert_allclose(norms([gray]), reference)  # 2-D array
    np.testing.assert_allclose(norms([gray[..., None]]), reference)  # (H, W, 1)
    np.testing.assert_allclose(norms([Image.fromarray(gray.astype(np.uint16) * 257)]), reference)  # "I;16", full range
    stretched = np.interp(gray, (gray.min(), gray.max()), (0, 255)).round().astype(np.uint8)
    wide = norms([Image.fromarray(gray.astype(np.int32) * 1000)])  # "I": its own min..max
    np.testing.assert_allclose(wide, norms([stretched]))
    np.testing.assert_allclose(norms([Image.fromarray(gray.astype(np.float32) / 255)]), norms([gray]))  # "F" in [0, 1]
    reference = norms([rgb])
    np.testing.assert_allclose(norms([Image.fromarray(np.dstack([rgb, gray]), "RGBA")]), reference)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    np.testing.assert_allclose(norms([cmyk]), norms([np.asarray(cmyk.convert("RGB"))]))
    assert Image.fromarray(gray.astype(np.uint16) * 257).mode == "I;16"


def test_arrays_that_are_not_images_are_refused():
    model = build_tiny_model("tiny-vit")
    for array in (np.zeros((30, 30, 4), np.uint8), np.zeros((3, 30, 30), np.uint8)):
        with pytest.raises(DataError) as error:
            find_artifacts(model, [_image(30, 30, 0), array])
        assert str(error.value) == (
            f"Image 1 is an array of shape {array.shape}; expected (height, width) for grayscale or (height, width, 3) "
            "for RGB. Convert it first, e.g. array[..., :3] to drop an alpha channel or array.transpose(1, 2, 0) for "
            "a channels-first array."
        )
    with pytest.raises(DataError) as error:
        find_artifacts(model, [{"image": None}])
    assert str(error.value) == (
        "Image 0 is a dict; expected a PIL image, a uint8 array (height, width[, 3]), a file path, or pixel values "
        "(batch, 3, height, width) as one tensor."
    )


def test_models_that_drop_patches_are_refused():
    with pytest.raises(
        UnsupportedModelError,
        match=r"^ViTMAEModel returned 56 patch tokens for a 15x15 grid; find_artifacts needs every patch in order",
    ):
        find_artifacts(build_tiny_model("tiny-vit-mae"), torch.zeros(1, 3, 30, 30))


def test_models_without_an_image_grid_are_refused():
    with pytest.raises(UnsupportedModelError) as error:
        find_artifacts(build_tiny_model("tiny-siglip2"), torch.zeros(1, 3, 30, 30))
    assert str(error.value) == (
        "Siglip2VisionModel takes pre-patchified pixel sequences, not images on a patch grid: artifact maps, attention "
        "maps and object discovery need a (B, 3, H, W) image model."
    )


def test_patch_views_show_cls_attention_on_artifacts(scene):
    planted = planted_model("dinov2")
    pixel_values = planted.preprocess(scene.images[:6])
    truth = planted.artifact_mask(pixel_values).numpy()
    views = patch_views(planted.model, pixel_values, batch_size=4)
    assert views.attention_kind == "CLS attention" and views.attention.shape == (6, 16, 16)
    assert (views.attention.sum((1, 2)) > 0.99).all()  # CLS attends to patches, barely to itself
    mass = (views.attention * truth).sum((1, 2))
    assert (mass > 10 * truth.mean((1, 2))).all()  # far more than the artifacts' share of the patches
    assert views.pca.shape == (6, 16, 16, 3) and views.pca.min() >= 0 and views.pca.max() <= 1
    assert planted.model.config._attn_implementation == "sdpa"  # eager only while drawing
    oracle = patch_views(planted.oracle, pixel_values)
    assert ((oracle.attention * truth).sum((1, 2)) < 3 * truth.mean((1, 2))).all()
    siglip = planted_model("siglip")
    assert patch_views(siglip.model, pixel_values).attention_kind == "mean attention received"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_detects_planted_artifacts_on_cuda(scene, dtype):
    planted = make_artifact_model("dinov2")
    pixel_values = planted.preprocess(scene.images)
    truth = planted.artifact_mask(pixel_values).numpy()
    report = find_artifacts(planted.model.to("cuda", dtype), pixel_values)  # pixel values follow the model
    precision, recall = precision_recall(report, truth)
    assert precision >= 0.95 and recall >= 0.95
    assert report.first_outlier_layer == planted.layer


def test_the_vision_tower_is_resolved_once_per_call(monkeypatch, scene):
    from register_adapter.architectures import VisionTower
    from register_adapter.diagnostics import discover_objects

    planted = planted_model("dinov2")
    pixel_values = planted.preprocess(scene.images[:4])
    created = []
    original = VisionTower.__init__

    def counting(self, *args, **kwargs):
        created.append(type(args[0] if args else kwargs["module"]).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(VisionTower, "__init__", counting)
    find_artifacts(planted.model, pixel_values, batch_size=2)
    patch_views(planted.model, pixel_values)
    discover_objects(planted.model, list(scene.images[:4]), processor=planted.processor, batch_size=2)
    assert created == ["Dinov2Model"] * 3

"""Image data for training: folder and dataset loading, checks before training, augmentation, metrics."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import datasets
import numpy as np
import PIL.ExifTags
import PIL.Image
import pytest
import torch
from transformers import CLIPImageProcessorPil, EvalPrediction, ViTImageProcessorPil

from register_adapter.errors import DataError
from register_adapter.images import image_extensions, load_image, rgb_image
from register_adapter.sources import (
    check_images,
    drop_unreadable_images,
    find_unreadable_images,
    load_unlabelled_images,
)
from register_adapter.training.augment import ImageClassificationTransform, apply_transforms, random_resized_crop_box
from register_adapter.training.data import check_labels, load_image_dataset, load_image_folder, take_samples
from register_adapter.training.metrics import ClassificationMetrics, top_k_predictions

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def make_image(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 34)) -> PIL.Image.Image:
    """A noisy image of one dominant colour: classes that a tiny model can tell apart."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255)
    return PIL.Image.fromarray(pixels.astype(np.uint8))


def make_image_folder(root: Path, classes=("blue", "red"), per_class: int = 6, seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` with ``per_class`` images per class."""
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(COLOURS[name], seed=seed + 100 * k + i).save(root / name / f"{i:03d}.png")
    return root


def processor(size: int = 30) -> ViTImageProcessorPil:
    return ViTImageProcessorPil(size={"height": size, "width": size})


# loading -----------------------------------------------------------------------------------------------------------


def test_image_folder_labels_are_sorted_class_folders_and_other_files_are_ignored(tmp_path):
    root = make_image_folder(tmp_path / "train", classes=("red", "blue"), per_class=2)
    (root / "red" / "notes.txt").write_text("not an image")
    # PIL registers these extensions but reads no pixels from them: save-only (.pdf, .palm) or stubs (.h5).
    for name in ("notes.pdf", "weights.h5", "icon.palm", "scan.eps"):
        (root / "blue" / name).write_bytes(b"not a raster image")
    (root / ".cache").mkdir()
    dataset = load_image_folder(root)
    assert dataset.features["label"].names == ["blue", "red"]
    assert [Path(dataset[i]["image"].filename).parent.name for i in range(4)] == ["blue", "blue", "red", "red"]
    assert dataset["label"] == [0, 0, 1, 1]


def test_image_extensions_are_the_raster_formats_pil_opens():
    extensions = image_extensions()
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".bmp", ".gif"} <= extensions
    assert not extensions & {".pdf", ".h5", ".hdf", ".palm", ".eps", ".ps", ".bufr", ".grib", ".wmf", ".mpg"}


def test_class_folders_without_images_are_not_classes(tmp_path, caplog):
    root = make_image_folder(tmp_path / "train", classes=("blue", "red"), per_class=2)
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("photos to come")
    with caplog.at_level(logging.WARNING, logger="register_adapter"):
        dataset = load_image_folder(root)
    assert dataset.features["label"].names == ["blue", "red"]
    assert dataset["label"] == [0, 0, 1, 1]
    assert f"Ignoring class folders without images in {str(root)!r}: zebra" in caplog.text


def test_one_class_with_images_next_to_an_empty_folder_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "train", classes=("blue",), per_class=4)
    (root / "zebra").mkdir()
    with pytest.raises(
        DataError,
        match=r"^Classification needs at least two classes with images; the training data has 1 \(blue\). "
        r"Add images of another class.$",
    ):
        load_image_dataset(train_dir=str(root))


def test_missing_folder_is_reported(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(
        DataError, match=f"^Image folder {re.escape(repr(str(missing)))} does not exist or is not a directory.$"
    ):
        load_image_folder(missing)


@pytest.mark.parametrize("kind", ["path", "relative with slash", "Path"])
def test_unlabelled_images_from_a_folder_that_does_not_exist_are_reported_as_such(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    source = {"path": str(tmp_path / "photos"), "relative with slash": "photos/", "Path": tmp_path / "photos"}[kind]
    with pytest.raises(DataError, match=f"^Image path {re.escape(repr(str(source)))} does not exist.$"):
        load_unlabelled_images(source)


def test_unlabelled_images_from_a_folder_under_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_image_folder(tmp_path / "photos", per_class=1)
    assert len(load_unlabelled_images("~/photos")) == 2


def test_folder_without_class_folders_is_reported(tmp_path):
    make_image(COLOURS["red"], 0).save(tmp_path / "flat.png")
    where = repr(str(tmp_path))
    with pytest.raises(
        DataError,
        match=f"^Image folder {re.escape(where)} has no class sub-folders. Expected the imagefolder layout "
        f"{re.escape(where)}/<class name>/<image file>.$",
    ):
        load_image_folder(tmp_path)


def test_class_folders_without_images_are_reported(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"^Image folder '.*' holds no image files \(looked for .* in cat, dog\).$"):
        load_image_folder(tmp_path)


def test_validation_folder_with_an_unknown_class_is_reported(tmp_path):
    make_image_folder(tmp_path / "train", classes=("blue", "red"), per_class=2)
    make_image_folder(tmp_path / "val", classes=("green", "red"), per_class=1)
    with pytest.raises(
        DataError,
        match=r"^Image folder '.*val' has classes that the training data does not have: green. "
        r"Known classes: blue, red.$",
    ):
        load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))


def test_validation_folder_uses_the_training_label_ids(tmp_path):
    make_image_folder(tmp_path / "train", classes=("blue", "green", "red"), per_class=2)
    make_image_folder(tmp_path / "val", classes=("red",), per_class=2)
    splits = load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    assert splits["validation"]["label"] == [2, 2]
    assert splits["validation"].features["label"].names == ["blue", "green", "red"]


def test_held_out_validation_is_stratified_and_disjoint(tmp_path):
    make_image_folder(tmp_path / "train", per_class=10)
    splits = load_image_dataset(train_dir=str(tmp_path / "train"), train_val_split=0.2, seed=3)
    assert (len(splits["train"]), len(splits["validation"])) == (16, 4)
    assert sorted(splits["validation"]["label"]) == [0, 0, 1, 1]
    train_files = {image.filename for image in splits["train"]["image"]}
    assert train_files.isdisjoint(image.filename for image in splits["validation"]["image"])
    assert splits["train"]["sample_id"] == list(range(16))


def test_no_validation_split_when_train_val_split_is_zero(tmp_path):
    make_image_folder(tmp_path / "train", per_class=3)
    splits = load_image_dataset(train_dir=str(tmp_path / "train"), train_val_split=0.0)
    assert list(splits) == ["train"]
    assert len(splits["train"]) == 6


HOLD_OUT_FIXES = (
    "pass --train_val_split 0 to train on all images without evaluation, or give validation images with "
    "--validation_dir (or --validation_split)."
)
HOLD_OUT_CASES = [
    # classes, images per class, train_val_split, message
    (3, 4, 0.1, "--train_val_split 0.1 holds out 2 of 12 training images for validation, fewer than the 3 classes: "
     "a stratified split needs one image of every class. Add images, pass a larger --train_val_split, "),
    (3, 2, 0.6, "--train_val_split 0.6 keeps 2 of 6 training images to train on, fewer than the 3 classes: "
     "a stratified split needs one image of every class. Add images, pass a smaller --train_val_split, "),
    (2, 1, 0.5, "--train_val_split 0.5 cannot hold out validation images of every class: 2 of 2 classes have a "
     "single training image (blue, red), and a stratified split needs two, one to train on and one to validate "
     "on. Add images to those classes, "),
]  # fmt: skip


@pytest.mark.parametrize(("classes", "per_class", "fraction", "message"), HOLD_OUT_CASES)
def test_held_out_validation_that_cannot_hold_every_class_is_refused(tmp_path, classes, per_class, fraction, message):
    root = make_image_folder(tmp_path / "train", classes=("blue", "red", "green")[:classes], per_class=per_class)
    with pytest.raises(DataError, match=f"^{re.escape(message + HOLD_OUT_FIXES)}$"):
        load_image_dataset(train_dir=str(root), train_val_split=fraction)


def test_held_out_validation_of_one_image_per_class_is_the_smallest_allowed(tmp_path):
    make_image_folder(tmp_path / "train", classes=("blue", "green", "red"), per_class=4)
    splits = load_image_dataset(train_dir=str(tmp_path / "train"), train_val_split=0.25)
    assert sorted(splits["validation"]["label"]) == [0, 1, 2]
    assert len(splits["train"]) == 9


def _saved_dataset(tmp_path: Path) -> str:
    images = [make_image(COLOURS[c], i) for i, c in enumerate(["red", "blue", "red", "blue"])]
    dataset = datasets.Dataset.from_dict(
        {"img": images, "fine_label": ["red", "blue", "red", "blue"], "extra": [1, 2, 3, 4]},
        features=datasets.Features(
            {"img": datasets.Image(), "fine_label": datasets.Value("string"), "extra": datasets.Value("int64")}
        ),
    )
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def test_named_dataset_columns_are_renamed_and_string_labels_encoded(tmp_path):
    path = _saved_dataset(tmp_path)
    splits = load_image_dataset(
        dataset_name=path, image_column="img", label_column="fine_label", validation_split="test"
    )
    assert splits["train"].column_names == ["image", "label", "sample_id"]
    assert splits["train"].features["label"].names == ["blue", "red"]
    assert splits["train"]["label"] == [1, 0, 1, 0]
    assert splits["validation"]["label"] == [1, 0, 1, 0]


def test_validation_label_missing_from_the_training_split_is_reported(tmp_path):
    images = [make_image(COLOURS[c], i) for i, c in enumerate(["red", "blue", "green", "red"])]
    train = datasets.Dataset.from_dict({"image": images[:2], "label": ["red", "blue"]})
    test = datasets.Dataset.from_dict({"image": images, "label": ["red", "blue", "green", "Purple"]})
    path = str(tmp_path / "saved")
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(path)
    with pytest.raises(
        DataError,
        match=rf"^Split 'test' of {re.escape(repr(path))} has labels that the training split 'train' does not have: "
        r"Purple, green. Known labels: blue, red. Remove those images from the validation split, or choose another "
        r"with --validation_split.$",
    ):
        load_image_dataset(dataset_name=path, validation_split="test")


def test_missing_label_column_is_reported(tmp_path):
    path = _saved_dataset(tmp_path)
    with pytest.raises(
        DataError,
        match=rf"^The label column 'label' does not exist in split 'train' of {re.escape(repr(path))}. "
        r"Available columns: img, fine_label, extra.$",
    ):
        load_image_dataset(dataset_name=path, image_column="img")


@pytest.mark.parametrize(
    ("option", "split", "flag"),
    [("train_split", "training", "--train_split"), ("validation_split", "tset", "--validation_split")],
)
def test_missing_split_is_reported_not_replaced(tmp_path, option, split, flag):
    path = _saved_dataset(tmp_path)
    with pytest.raises(
        DataError,
        match=rf"^The dataset {re.escape(repr(path))} has no split '{split}' \({flag}\). Available splits: train, test.$",
    ):
        load_image_dataset(dataset_name=path, image_column="img", label_column="fine_label", **{option: split})


def test_validation_split_defaults_to_the_datasets_validation_split_if_it_has_one(tmp_path):
    images = [make_image(COLOURS[c], i, size=(8, 8)) for i, c in enumerate(["red", "blue"] * 4)]
    rows = datasets.Dataset.from_dict({"image": images, "label": ["red", "blue"] * 4})
    with_validation = str(tmp_path / "with")
    datasets.DatasetDict({"train": rows, "validation": rows.select(range(2))}).save_to_disk(with_validation)
    without = str(tmp_path / "without")
    datasets.DatasetDict({"train": rows, "test": rows.select(range(2))}).save_to_disk(without)
    assert {name: len(split) for name, split in load_image_dataset(dataset_name=with_validation).items()} == {
        "train": 8,
        "validation": 2,
    }
    held_out = load_image_dataset(dataset_name=without, train_val_split=0.25)  # "test" is not taken implicitly
    assert {name: len(split) for name, split in held_out.items()} == {"train": 6, "validation": 2}


def test_validation_split_with_image_folders_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=2)
    with pytest.raises(
        DataError, match="^--validation_split goes with --dataset_name; with --train_dir use --validation_dir.$"
    ):
        load_image_dataset(train_dir=str(root), validation_split="validation")


def save_labelled_dataset(tmp_path: Path, labels: dict[str, list], feature: datasets.features.FeatureType) -> str:
    """A saved dataset whose splits hold tiny images with the given ``labels`` (a ``label`` column of ``feature``)."""
    splits = {}
    for name, values in labels.items():
        images = [make_image(COLOURS["red"], i, size=(4, 4)) for i in range(len(values))]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        rows = datasets.Dataset.from_dict({"image": images, "label": values}, features=features)
        splits[name] = rows.cast_column("label", feature)  # a cast does not check the labels, as old files may not
    path = str(tmp_path / "saved")
    datasets.DatasetDict(splits).save_to_disk(path)
    return path


def test_integer_labels_keep_their_ids_and_get_names_in_numeric_order(tmp_path):
    # class_encode_column would sort 0..10 as strings ("0", "1", "10", "2", ...) and move every id from 2 on.
    train = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 2]
    path = save_labelled_dataset(tmp_path, {"train": train, "validation": [10, 3]}, datasets.Value("int64"))
    splits = load_image_dataset(dataset_name=path)
    assert splits["train"].features["label"].names == [str(i) for i in range(11)]
    assert splits["train"]["label"] == train
    assert splits["validation"].features["label"].names == [str(i) for i in range(11)]
    assert splits["validation"]["label"] == [10, 3]


BAD_LABELS = [0, 1] * 15 + [-1] + [1, 0] * 4  # row 30 holds -1, the datasets convention for "no label"


def test_label_outside_the_classes_stops_before_training(tmp_path):
    path = save_labelled_dataset(tmp_path, {"train": BAD_LABELS}, datasets.ClassLabel(names=["cat", "dog"]))
    with pytest.raises(
        DataError,
        match=r"^1 of 39 train rows have no label or a label outside 0..1 \(2 classes\): rows 30. "
        r"Fix or remove those rows, or pass --on_bad_image skip to leave them out.$",
    ):
        load_image_dataset(dataset_name=path)


def test_missing_labels_are_listed_by_row_in_the_split_they_are_in(tmp_path):
    validation = [None, 1, 7, None] + [0] * 10 + [None] * 10
    path = save_labelled_dataset(tmp_path, {"train": [0, 1, 0, 1], "validation": validation}, datasets.Value("int64"))
    with pytest.raises(
        DataError,
        match=r"^13 of 24 validation rows have no label or a label outside 0..1 \(2 classes\): rows 0, 2, 3, 14, "
        r"15, 16, 17, 18, 19, 20 and 3 more. Fix or remove those rows, or pass --on_bad_image skip to leave them out.$",
    ):
        load_image_dataset(dataset_name=path)


def test_bad_labels_are_skipped_with_a_warning(tmp_path, caplog):
    path = save_labelled_dataset(
        tmp_path, {"train": BAD_LABELS[:30] + [None, -1, 5]}, datasets.ClassLabel(num_classes=2)
    )
    with caplog.at_level(logging.WARNING, logger="register_adapter"):
        splits = load_image_dataset(dataset_name=path, on_bad_label="skip", train_val_split=0)
    assert splits["train"]["label"] == BAD_LABELS[:30]
    assert "Skipping them: 3 of 33 train rows have no label or a label outside 0..1 (2 classes): rows 30, 31, 32." in (
        caplog.text
    )


def test_no_usable_label_is_an_error_even_when_skipping():
    rows = datasets.Dataset.from_dict(
        {"label": [-1, None]}, features=datasets.Features({"label": datasets.ClassLabel(num_classes=3)})
    )
    with pytest.raises(
        DataError,
        match=r"^2 of 2 train rows have no label or a label outside 0..2 \(3 classes\): rows 0, 1. "
        r"No row of this split has a usable label.$",
    ):
        check_labels(rows, on_bad_label="skip")


def test_exactly_one_source_is_required(tmp_path):
    with pytest.raises(
        DataError, match="^Give exactly one source of training images: --train_dir or --dataset_name.$"
    ):
        load_image_dataset()


# checks before training ------------------------------------------------------------------------------------------


def _folder_with_corrupt_image(tmp_path: Path) -> tuple[datasets.Dataset, Path]:
    root = make_image_folder(tmp_path / "train", per_class=4)
    corrupt = root / "blue" / "001.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return load_image_folder(root), corrupt


def test_corrupt_image_in_the_middle_stops_before_training(tmp_path):
    dataset, corrupt = _folder_with_corrupt_image(tmp_path)
    with pytest.raises(
        DataError,
        match=rf"^1 of 8 train images cannot be read: {re.escape(str(corrupt))} \(.*\). "
        r"Remove or replace them, or pass --on_bad_image skip to leave them out.$",
    ):
        check_images(dataset)


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, caplog):
    dataset, corrupt = _folder_with_corrupt_image(tmp_path)
    with caplog.at_level(logging.WARNING, logger="register_adapter"):
        kept = check_images(dataset, on_bad_image="skip")
    assert len(kept) == 7
    assert str(corrupt) not in [image.filename for image in kept["image"]]
    assert f"Skipping 1 of 8 train images that cannot be read: {corrupt}" in caplog.text


def test_truncated_image_is_found_by_decoding_but_not_by_the_header_check(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=2)
    truncated = root / "red" / "000.jpg"
    buffer = truncated.with_suffix(".tmp")
    make_image(COLOURS["red"], 7, size=(128, 128)).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.read_bytes()[:4000])
    buffer.unlink()
    dataset = load_image_folder(root)
    assert len(check_images(dataset, on_bad_image="skip", check="header")) == 5
    assert len(check_images(dataset, on_bad_image="skip", check="decode")) == 4


def test_all_images_unreadable_is_an_error_even_when_skipping(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"broken")
    with pytest.raises(
        DataError, match=r"^2 of 2 train images cannot be read: .* No image of this split can be read.$"
    ):
        check_images(load_image_folder(tmp_path), on_bad_image="skip")


def test_unreadable_images_found_once_can_be_applied_on_another_copy_of_the_split(tmp_path):
    # What a multi-process run does: the main process finds the problems, every process drops the same rows.
    dataset, corrupt = _folder_with_corrupt_image(tmp_path)
    problems = find_unreadable_images(dataset)
    assert list(problems) == [1] and problems[1].startswith("UnidentifiedImageError: ")
    kept = drop_unreadable_images(load_image_folder(tmp_path / "train"), problems, on_bad_image="skip")
    assert [Path(image.filename).name for image in kept["image"]] == ["000.png", "002.png", "003.png"] + [
        f"{i:03d}.png" for i in range(4)
    ]


def test_max_samples_draw_several_classes_reproducibly(tmp_path):
    make_image_folder(tmp_path / "train", classes=("blue", "green", "red"), per_class=10)
    rows = load_image_dataset(train_dir=str(tmp_path / "train"), train_val_split=0)["train"]
    assert list(rows.select(range(6))["label"]) == [0] * 6  # folder rows are sorted by class
    subset = take_samples(rows, 6, seed=0)
    assert len(subset) == 6 and set(subset["label"]) == {0, 1, 2}
    assert list(take_samples(rows, 6, seed=0)["sample_id"]) == list(subset["sample_id"])
    assert list(take_samples(rows, 6, seed=1)["sample_id"]) != list(subset["sample_id"])
    assert take_samples(rows, None, seed=0) is rows and take_samples(rows, 30, seed=0) is rows


# augmentation ------------------------------------------------------------------------------------------------------


def test_random_resized_crop_box_stays_inside_the_image_and_respects_the_area_range():
    rng = np.random.default_rng(0)
    for width, height in [(40, 34), (300, 20), (7, 90)]:
        for _ in range(200):
            left, top, right, bottom = random_resized_crop_box(width, height, rng, scale=(0.25, 1.0))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            ratio = (right - left) / (bottom - top)
            if (right - left, bottom - top) != (width, height) and 3 / 4 <= width / height <= 4 / 3:
                assert (right - left) * (bottom - top) >= 0.25 * width * height * 0.8
                assert 3 / 4 * 0.8 <= ratio <= 4 / 3 * 1.25


def test_training_augmentation_is_a_function_of_seed_epoch_and_sample():
    image = make_image(COLOURS["red"], 0, size=(50, 37))
    batch = {"image": [image, image], "label": [1, 1], "sample_id": [0, 1]}
    transform = ImageClassificationTransform(processor(), train=True, seed=5)
    first = transform(batch)["pixel_values"]
    assert first.shape == (2, 3, 30, 30)
    assert not torch.equal(first[0], first[1])  # two samples, two crops
    assert torch.equal(ImageClassificationTransform(processor(), train=True, seed=5)(batch)["pixel_values"], first)
    transform.epoch = 1
    assert not torch.equal(transform(batch)["pixel_values"], first)
    transform.epoch = 0
    assert torch.equal(transform(batch)["pixel_values"], first)
    assert transform(batch)["labels"].tolist() == [1, 1]


def test_evaluation_transform_is_the_image_processor_alone():
    clip = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    images = [make_image(COLOURS["blue"], 1, size=(48, 36)), make_image(COLOURS["red"], 2, size=(30, 30)).convert("L")]
    batch = {"image": images, "label": [0, 1], "sample_id": [0, 1]}
    pixels = ImageClassificationTransform(clip, train=False)(batch)["pixel_values"]
    expected = clip(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, expected)
    assert pixels.shape == (2, 3, 30, 30)


def test_a_file_path_is_read_upright_as_its_exif_orientation_says_as_datasets_reads_it(tmp_path):
    from register_adapter.architectures import find_vision_tower
    from register_adapter.images import load_image
    from register_adapter.pixels import as_pixel_values
    from register_adapter.tiny import build_tiny_model

    raw = make_image(COLOURS["red"], seed=0, size=(512, 320))
    exif = PIL.Image.Exif()
    exif[PIL.ExifTags.Base.Orientation] = 6  # stored landscape, shown rotated by 90 degrees
    path = tmp_path / "portrait.jpg"
    raw.save(path, exif=exif)

    upright = load_image(path)
    by_datasets = datasets.Image().decode_example({"path": str(path), "bytes": None}).convert("RGB")
    assert upright.size == by_datasets.size == (320, 512)
    assert np.array_equal(np.asarray(upright), np.asarray(by_datasets))
    tower = find_vision_tower(build_tiny_model("tiny-vit"))
    assert torch.equal(as_pixel_values([path], tower, processor()), as_pixel_values([by_datasets], tower, processor()))


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white_by_training_and_diagnostics(tmp_path):
    gradient = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    (tmp_path / "grey").mkdir()
    PIL.Image.fromarray(gradient).save(tmp_path / "grey" / "gradient.png")
    expected = np.stack([np.round(gradient / 257).astype(np.uint8)] * 3, axis=-1)  # 65535 -> 255
    dataset = load_image_folder(tmp_path)
    assert dataset[0]["image"].mode == "I;16"
    assert np.array_equal(np.asarray(rgb_image(dataset[0]["image"])), expected)  # training reads it so
    assert np.array_equal(np.asarray(load_image(tmp_path / "grey" / "gradient.png")), expected)  # diagnostics too

    dataset.set_transform(ImageClassificationTransform(processor(), train=False))
    plain = processor()(images=[PIL.Image.fromarray(expected)], return_tensors="pt")["pixel_values"]
    assert torch.equal(dataset[0]["pixel_values"], plain[0])


def test_32_bit_and_float_images_are_scaled_to_8_bits():
    sixteen_bit_values = PIL.Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.int32))
    assert sixteen_bit_values.mode == "I"
    assert np.asarray(rgb_image(sixteen_bit_values))[0, :, 0].tolist() == [0, 100, 255]
    wide = PIL.Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))  # beyond 16 bits: its own range
    assert np.asarray(rgb_image(wide))[0, :, 0].tolist() == [0, 128, 255]
    unit = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(rgb_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    flat = PIL.Image.fromarray(np.full((2, 2), 7.5, dtype=np.float32))
    assert np.asarray(rgb_image(flat)).max() == 0


def test_apply_transforms_augments_only_the_training_split(tmp_path):
    make_image_folder(tmp_path / "train", per_class=4)
    splits = load_image_dataset(train_dir=str(tmp_path / "train"), train_val_split=0.25)
    apply_transforms(splits, processor(), seed=0)
    for name, augmented in (("train", True), ("validation", False)):
        item = splits[name][0]
        assert set(item) == {"pixel_values", "labels"}
        raw = splits[name].with_format(None)[0]["image"].convert("RGB")
        plain = processor()(images=[raw], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(item["pixel_values"], plain) is not augmented


# metrics -------------------------------------------------------------------------------------------------------------


def test_accuracy_and_top5_from_logits_through_the_trainer_hooks():
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 3],  # label 0: top-1 hit
            [9.0, 8, 7, 6, 5, 4, 3],  # label 4: top-5 hit only
            [9.0, 8, 7, 6, 5, 4, 3],  # label 6: miss
            [0.0, 0, 0, 0, 0, 0, 1],  # label 6: top-1 hit
        ]
    )
    labels = torch.tensor([0, 4, 6, 6])
    ranked = top_k_predictions(logits, labels)
    assert ranked.shape == (4, 5)
    metrics = ClassificationMetrics(num_labels=7)(EvalPrediction(predictions=ranked.numpy(), label_ids=labels.numpy()))
    assert metrics == {"accuracy": 0.5, "top5_accuracy": 0.75}
    raw = ClassificationMetrics(num_labels=7)(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy()))
    assert raw == metrics


def test_top5_is_left_out_with_five_classes_or_fewer_and_tuple_logits_use_the_first():
    logits = (torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.zeros(2, 2))
    ranked = top_k_predictions(logits, torch.tensor([1, 1]))
    assert ranked.tolist() == [[1, 0], [0, 1]]
    metrics = ClassificationMetrics(num_labels=2)(
        EvalPrediction(predictions=ranked.numpy(), label_ids=np.array([1, 1]))
    )
    assert metrics == {"accuracy": 0.5}

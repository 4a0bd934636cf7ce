"""Labelled image data for classification fine-tuning: loading, validation and augmentation.

Data comes either from folders in ``imagefolder`` layout (``root/<class name>/<image>``, classes sorted by name) or
from a ``datasets`` dataset (a Hub name, a loading script or a folder written by ``save_to_disk``). Every problem
that would otherwise surface hours into a run is found before training starts and reported as a
:class:`~register_adapter.errors.DataError`: a missing or empty folder, a missing column, a missing or out-of-range
label, a corrupt image.

Images are preprocessed lazily (``Dataset.set_transform``) with the model's own image processor (PIL backend). The
training transform adds a random resized crop and a horizontal flip, written with PIL. Its randomness is a pure
function of ``(seed, epoch, sample_id)``, so an augmented sample does not depend on the order in which batches are
drawn: a run resumed from a checkpoint, a multi-process run and a single-process run see the same pixels.

>>> from register_adapter.data import load_image_folder
>>> train = load_image_folder("data/train")  # doctest: +SKIP
>>> train.features["label"].names  # doctest: +SKIP
['cat', 'dog']
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow.compute as pc
import torch

from .errors import DataError
from .images import rgb_image, size_field

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
SAMPLE_ID_COLUMN = "sample_id"
BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_CHECKS = ("decode", "header", "none")
_MAX_LISTED = 10
# Formats PIL registers an extension for but cannot read pixels from on its own: save-only (PDF, PALM), stubs that
# need an external handler (BUFR, GRIB, HDF5), Ghostscript (EPS), Windows (WMF), metadata (IPTC), video (MPEG).
_NOT_RASTER_FORMATS = frozenset({"BUFR", "EPS", "GRIB", "HDF5", "IPTC", "MPEG", "PALM", "PDF", "WMF"})


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the raster formats PIL can open: the files an image folder uses."""
    PIL.Image.init()
    return frozenset(
        ext.lower() for ext, fmt in PIL.Image.registered_extensions().items() if fmt not in _NOT_RASTER_FORMATS
    )


def load_image_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None) -> datasets.Dataset:
    """Load a folder in ``imagefolder`` layout: one sub-folder per class, images anywhere below it.

    Files that are not raster images PIL can open (``README.txt``, ``.DS_Store``, ``notes.pdf``) are ignored, and so
    are class folders without images (with a warning); images are not decoded here (see :func:`check_images`).

    Args:
        root: the folder holding one sub-folder per class.
        class_names: the label names to use, in label-id order (those of the training folder when loading a
            validation folder). Default: the names of the sub-folders that hold images, sorted.

    Returns:
        A dataset with an ``image`` column (``datasets.Image``) and a ``label`` column (``datasets.ClassLabel``).

    Raises:
        DataError: the folder does not exist, has no class sub-folders, holds no image, or (with ``class_names``)
            has a class that is not among ``class_names``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Image folder {str(root)!r} does not exist or is not a directory.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(
            f"Image folder {str(root)!r} has no class sub-folders. Expected the imagefolder layout "
            f"{str(root)!r}/<class name>/<image file>."
        )
    extensions = image_extensions()
    files = {
        name: sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        for name in found
    }
    with_images = [name for name in found if files[name]]
    if not with_images:
        raise DataError(
            f"Image folder {str(root)!r} holds no image files (looked for {', '.join(sorted(extensions)[:8])}, ... "
            f"in {', '.join(found)})."
        )
    if len(with_images) < len(found):
        empty = [name for name in found if not files[name]]
        logger.warning("Ignoring class folders without images in %r: %s", str(root), ", ".join(empty))
    names = list(class_names) if class_names is not None else with_images
    unknown = sorted(set(with_images) - set(names))
    if unknown:
        raise DataError(
            f"Image folder {str(root)!r} has classes that the training data does not have: {', '.join(unknown)}. "
            f"Known classes: {', '.join(names)}."
        )
    paths = [str(p) for name in with_images for p in files[name]]
    labels = [names.index(name) for name in with_images for _ in files[name]]
    features = datasets.Features({IMAGE_COLUMN: datasets.Image(), LABEL_COLUMN: datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({IMAGE_COLUMN: paths, LABEL_COLUMN: labels}, features=features)


def _load_named_dataset(name: str, config_name: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    """A dataset by Hub name or loading script, or a folder written by ``save_to_disk``, as a ``DatasetDict``."""
    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise DataError(f"Could not load the dataset {name!r}: {error}") from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _normalise_columns(
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str,
    where: str,
    class_names: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Check the image and label columns, rename them to ``image``/``label`` and make the labels a ``ClassLabel``.

    Integer labels keep their ids: they become ``ClassLabel(names=class_names)`` (the training classes, for a
    validation split) or ``"0"`` ... ``"N-1"`` for the largest id ``N-1``. Other labels (strings) are encoded in
    sorted order.
    """
    for kind, column in (("image", image_column), ("label", label_column)):
        if column not in dataset.column_names:
            raise DataError(
                f"The {kind} column {column!r} does not exist in {where}. "
                f"Available columns: {', '.join(dataset.column_names)}."
            )
    dataset = dataset.select_columns([image_column, label_column])
    if image_column != IMAGE_COLUMN:
        dataset = dataset.rename_column(image_column, IMAGE_COLUMN)
    if label_column != LABEL_COLUMN:
        dataset = dataset.rename_column(label_column, LABEL_COLUMN)
    image_feature = dataset.features[IMAGE_COLUMN]
    if isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string"):
        dataset = dataset.cast_column(IMAGE_COLUMN, datasets.Image())  # a column of file paths
    elif not isinstance(image_feature, datasets.Image):
        raise DataError(
            f"The image column {image_column!r} in {where} holds {image_feature!r}, not images. "
            "Expected a datasets.Image feature or file paths."
        )
    label_feature = dataset.features[LABEL_COLUMN]
    if isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint")):
        dataset = dataset.cast_column(LABEL_COLUMN, _integer_class_label(dataset, class_names))
    elif not isinstance(label_feature, datasets.ClassLabel):
        dataset = dataset.class_encode_column(LABEL_COLUMN)
    return dataset


def _integer_class_label(dataset: datasets.Dataset, class_names: Sequence[str] | None) -> datasets.ClassLabel:
    """The ``ClassLabel`` of integer labels, keeping their ids (``class_encode_column`` would sort them as strings,
    ``"10"`` before ``"2"``). Missing and negative labels are left for :func:`check_labels` to report."""
    if class_names is not None:
        return datasets.ClassLabel(names=list(class_names))
    largest = pc.max(_label_array(dataset)).as_py()  # None when every label is missing
    return datasets.ClassLabel(num_classes=largest + 1 if largest is not None and largest >= 0 else 0)


def _label_array(dataset: datasets.Dataset) -> Any:
    """The label column as an Arrow array: iterating it in Python takes seconds per million rows."""
    return dataset.with_format("arrow")[LABEL_COLUMN]


def load_image_dataset(
    *,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_split: str = "train",
    validation_split: str | None = None,
    image_column: str = IMAGE_COLUMN,
    label_column: str = LABEL_COLUMN,
    train_val_split: float = 0.15,
    seed: int = 42,
    cache_dir: str | None = None,
    on_bad_label: str = "error",
) -> datasets.DatasetDict:
    """Load labelled images for classification as a ``DatasetDict`` with a ``train`` and maybe a ``validation`` split.

    Either ``train_dir`` (with an optional ``validation_dir``), both in ``imagefolder`` layout, or ``dataset_name``
    (with an optional ``validation_split``; by default its ``validation`` split, if it has one). Without a validation
    split, ``train_val_split`` of the training images (stratified by label) are held out; ``train_val_split=0`` keeps
    them all for training and leaves no validation split.

    Columns are renamed to ``image`` and ``label`` (a ``ClassLabel``; integer labels keep their ids, string labels
    are encoded) and every split gets a ``sample_id`` column that seeds its augmentation. Rows whose label is missing
    or not a class id are refused or, with ``on_bad_label="skip"``, dropped (see :func:`check_labels`). Images are
    not decoded (see :func:`check_images`).

    Raises:
        DataError: no source or two sources given; a folder is missing or empty; a split or column does not exist;
            a missing or out-of-range label (unless skipped); fewer than two classes with images; a validation label
            that is not a training class; a ``train_val_split`` that cannot hold out an image of every class and
            keep one (a class with a single image, or fewer held-out or kept images than classes).
    """
    if (train_dir is None) == (dataset_name is None):
        raise DataError("Give exactly one source of training images: --train_dir or --dataset_name.")
    if not 0.0 <= train_val_split < 1.0:
        raise DataError(f"train_val_split must be in [0, 1), got {train_val_split}.")
    check_choice("on_bad_image", on_bad_label, BAD_IMAGE_POLICIES)
    splits: dict[str, datasets.Dataset] = {}
    if train_dir is not None:
        if validation_split is not None:
            raise DataError("--validation_split goes with --dataset_name; with --train_dir use --validation_dir.")
        splits["train"] = load_image_folder(train_dir)
        if validation_dir is not None:
            splits["validation"] = load_image_folder(validation_dir, splits["train"].features[LABEL_COLUMN].names)
    else:
        if validation_dir is not None:
            raise DataError("--validation_dir goes with --train_dir; with --dataset_name use --validation_split.")
        splits = _load_named_splits(
            dataset_name,
            dataset_config_name,
            train_split=train_split,
            validation_split=validation_split,
            image_column=image_column,
            label_column=label_column,
            cache_dir=cache_dir,
            on_bad_label=on_bad_label,
        )
    if len(splits["train"]) == 0:
        raise DataError("The training split is empty.")
    names = splits["train"].features[LABEL_COLUMN].names
    present = [names[i] for i in sorted(splits["train"].unique(LABEL_COLUMN))]
    if len(present) < 2:
        raise DataError(
            f"Classification needs at least two classes with images; the training data has {len(present)} "
            f"({', '.join(present)}). Add images of another class."
        )
    if "validation" not in splits and train_val_split > 0:
        _check_hold_out(splits["train"], train_val_split)
        held_out = splits["train"].train_test_split(
            test_size=train_val_split, seed=seed, stratify_by_column=LABEL_COLUMN
        )
        splits = {"train": held_out["train"], "validation": held_out["test"]}
    return datasets.DatasetDict(
        {name: split.add_column(SAMPLE_ID_COLUMN, list(range(len(split)))) for name, split in splits.items()}
    )


def _load_named_splits(
    dataset_name: str,
    config_name: str | None,
    *,
    train_split: str,
    validation_split: str | None,
    image_column: str,
    label_column: str,
    cache_dir: str | None,
    on_bad_label: str,
) -> dict[str, datasets.Dataset]:
    """The ``train`` (and ``validation``, if any) split of a named dataset, normalised, with labels checked."""
    loaded = _load_named_dataset(dataset_name, config_name, cache_dir)
    for flag, split in (("--train_split", train_split), ("--validation_split", validation_split)):
        if split is not None and split not in loaded:
            raise DataError(
                f"The dataset {dataset_name!r} has no split {split!r} ({flag}). Available splits: {', '.join(loaded)}."
            )
    if validation_split is None and "validation" in loaded:
        validation_split = "validation"
    train = _normalise_columns(
        loaded[train_split], image_column, label_column, f"split {train_split!r} of {dataset_name!r}"
    )
    splits = {"train": check_labels(train, on_bad_label=on_bad_label, split=train_split)}
    if validation_split is None:
        return splits
    where = f"split {validation_split!r} of {dataset_name!r}"
    names = train.features[LABEL_COLUMN].names
    validation = _normalise_columns(loaded[validation_split], image_column, label_column, where, names)
    validation = check_labels(validation, on_bad_label=on_bad_label, split=validation_split)
    if validation.features[LABEL_COLUMN].names != names:
        _check_known_labels(validation, names, f"Split {validation_split!r} of {dataset_name!r}", train_split)
        validation = validation.align_labels_with_mapping({n: i for i, n in enumerate(names)}, LABEL_COLUMN)
        validation = validation.cast_column(LABEL_COLUMN, datasets.ClassLabel(names=names))
    splits["validation"] = validation
    return splits


def find_bad_labels(dataset: datasets.Dataset) -> list[int]:
    """The rows of ``dataset`` whose label is missing (``None``) or not a class id in ``[0, num_classes)``."""
    labels = _label_array(dataset)
    valid = pc.and_(pc.greater_equal(labels, 0), pc.less(labels, dataset.features[LABEL_COLUMN].num_classes))
    return np.flatnonzero(~pc.fill_null(valid, False).to_numpy(zero_copy_only=False)).tolist()


def check_labels(dataset: datasets.Dataset, *, on_bad_label: str = "error", split: str = "train") -> datasets.Dataset:
    """Refuse (``on_bad_label="error"``) or drop with a warning (``"skip"``) the rows without a usable label.

    A ``-1`` (the ``datasets`` convention for "no label"), a ``None`` or an id beyond the classes would otherwise
    stop training at the first batch that holds one, possibly after hours and several checkpoints.

    Raises:
        DataError: some labels are bad and ``on_bad_label="error"``, or every label is bad.
    """
    check_choice("on_bad_image", on_bad_label, BAD_IMAGE_POLICIES)
    bad = find_bad_labels(dataset)
    if not bad:
        return dataset
    num_classes = dataset.features[LABEL_COLUMN].num_classes
    rows = ", ".join(str(i) for i in bad[:_MAX_LISTED])
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    problem = (
        f"{len(bad)} of {len(dataset)} {split} rows have no label or a label outside 0..{num_classes - 1} "
        f"({num_classes} classes): rows {rows}{more}."
    )
    if on_bad_label == "error" or len(bad) == len(dataset):
        hint = "Fix or remove those rows, or pass --on_bad_image skip to leave them out."
        if len(bad) == len(dataset):
            hint = "No row of this split has a usable label."
        raise DataError(f"{problem} {hint}")
    logger.warning("Skipping them: %s", problem)
    bad_rows = set(bad)
    return dataset.select([i for i in range(len(dataset)) if i not in bad_rows])


def _check_known_labels(validation: datasets.Dataset, names: Sequence[str], where: str, train_split: str) -> None:
    """Refuse validation labels that are not training classes (compared in lower case, as ``datasets`` aligns them)."""
    known = {name.lower() for name in names}
    label_names = validation.features[LABEL_COLUMN].names
    unseen = sorted({label_names[i] for i in validation.unique(LABEL_COLUMN) if label_names[i].lower() not in known})
    if unseen:
        raise DataError(
            f"{where} has labels that the training split {train_split!r} does not have: {', '.join(unseen)}. "
            f"Known labels: {', '.join(names)}. Remove those images from the validation split, or choose another "
            "with --validation_split."
        )


def _check_hold_out(train: datasets.Dataset, fraction: float) -> None:
    """Refuse a hold-out that ``train_test_split`` cannot stratify: every class needs an image on each side."""
    names = train.features[LABEL_COLUMN].names
    counts = np.bincount(_label_array(train).to_numpy(), minlength=len(names))
    classes = int((counts > 0).sum())
    held_out = math.ceil(fraction * len(train))  # as Dataset.train_test_split counts it
    kept = len(train) - held_out
    fixes = (
        "pass --train_val_split 0 to train on all images without evaluation, or give validation images with "
        "--validation_dir (or --validation_split)."
    )
    single = [name for name, count in zip(names, counts) if count == 1]
    if single:
        more = f" and {len(single) - _MAX_LISTED} more" if len(single) > _MAX_LISTED else ""
        raise DataError(
            f"--train_val_split {fraction} cannot hold out validation images of every class: {len(single)} of "
            f"{classes} classes have a single training image ({', '.join(single[:_MAX_LISTED])}{more}), and a "
            f"stratified split needs two, one to train on and one to validate on. Add images to those classes, {fixes}"
        )
    if held_out < classes:
        raise DataError(
            f"--train_val_split {fraction} holds out {held_out} of {len(train)} training images for validation, "
            f"fewer than the {classes} classes: a stratified split needs one image of every class. Add images, pass "
            f"a larger --train_val_split, {fixes}"
        )
    if kept < classes:
        raise DataError(
            f"--train_val_split {fraction} keeps {kept} of {len(train)} training images to train on, fewer than the "
            f"{classes} classes: a stratified split needs one image of every class. Add images, pass a smaller "
            f"--train_val_split, {fixes}"
        )


def _image_problem(value: dict[str, Any], check: str) -> str | None:
    """Why the undecoded image ``value`` (``{"bytes", "path"}``) cannot be used, or ``None`` if it can."""
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
    if source is None:
        return "no bytes and no path"
    try:
        with PIL.Image.open(source) as image:
            if check == "header":
                image.verify()
            else:
                image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return f"{type(error).__name__}: {error}"
    return None


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Refuse a ``value`` of the option ``name`` (``on_bad_image``, ``image_check``) that is not among ``choices``."""
    if value not in choices:
        raise DataError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")


def check_images(
    dataset: datasets.Dataset,
    *,
    on_bad_image: str = "error",
    check: str = "decode",
    split: str = "train",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Open every image of ``dataset`` once, before training, and deal with the ones that cannot be read.

    Args:
        dataset: a dataset with an ``image`` column.
        on_bad_image: ``"error"`` raises a :class:`DataError` that lists the unreadable images; ``"skip"`` drops
            them with a warning.
        check: ``"decode"`` decodes every image fully (finds truncated files); ``"header"`` only checks the file
            header (faster, misses truncation); ``"none"`` checks nothing.
        split: the split name, for messages.
        num_proc: worker processes for the check.

    Returns:
        ``dataset``, without the unreadable images when ``on_bad_image="skip"``.
    """
    check_choice("on_bad_image", on_bad_image, BAD_IMAGE_POLICIES)
    check_choice("image_check", check, IMAGE_CHECKS)
    problems = find_unreadable_images(dataset, check=check, split=split, num_proc=num_proc)
    return drop_unreadable_images(dataset, problems, on_bad_image=on_bad_image, split=split)


def find_unreadable_images(
    dataset: datasets.Dataset, *, check: str = "decode", split: str = "train", num_proc: int | None = None
) -> dict[int, str]:
    """Open every image of ``dataset`` once: the rows whose image cannot be read, with the reason.

    The half of :func:`check_images` that reads the files; a multi-process run does it on one process and shares
    the result (see :mod:`register_adapter.train`).
    """
    check_choice("image_check", check, IMAGE_CHECKS)
    if check == "none" or len(dataset) == 0:
        return {}
    raw = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    problems = raw.map(
        lambda images: {"_problem": [_image_problem(image, check) for image in images]},
        input_columns=IMAGE_COLUMN,
        batched=True,
        num_proc=num_proc,
        remove_columns=raw.column_names,
        desc=f"Checking {split} images",
    )["_problem"]
    return {i: problem for i, problem in enumerate(problems) if problem is not None}


def drop_unreadable_images(
    dataset: datasets.Dataset, problems: dict[int, str], *, on_bad_image: str = "error", split: str = "train"
) -> datasets.Dataset:
    """Apply the ``on_bad_image`` policy to the ``problems`` that :func:`find_unreadable_images` found."""
    check_choice("on_bad_image", on_bad_image, BAD_IMAGE_POLICIES)
    if not problems:
        return dataset
    bad = sorted(problems)
    raw = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    names = [raw[i][IMAGE_COLUMN].get("path") or f"row {i}" for i in bad[:_MAX_LISTED]]
    listing = "; ".join(f"{name} ({problems[i]})" for name, i in zip(names, bad))
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    if on_bad_image == "error" or len(bad) == len(dataset):
        hint = "Remove or replace them, or pass --on_bad_image skip to leave them out."
        if len(bad) == len(dataset):
            hint = "No image of this split can be read."
        raise DataError(f"{len(bad)} of {len(dataset)} {split} images cannot be read: {listing}{more}. {hint}")
    logger.warning(
        "Skipping %d of %d %s images that cannot be read: %s%s", len(bad), len(dataset), split, listing, more
    )
    return dataset.select([i for i in range(len(dataset)) if i not in problems])


def take_samples(dataset: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """``count`` rows drawn at random with ``seed`` (all of them when ``count`` is None or too large).

    Shuffled first, as transformers' example scripts take ``--max_train_samples``: folder rows are sorted by class,
    so the first rows could all be one class.
    """
    if count is None or count >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(count))


def target_size(image_processor: Any) -> tuple[int, int]:
    """``(height, width)`` of the pixel values that ``image_processor`` produces."""
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        size = image_processor.crop_size
    else:
        size = image_processor.size
    height, width, edge = (size_field(size, key) for key in ("height", "width", "shortest_edge"))
    if height and width:
        return int(height), int(width)
    if edge:
        return int(edge), int(edge)
    raise DataError(f"Cannot tell the output size of the image processor {type(image_processor).__name__}: {size}.")


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random crop ``(left, top, right, bottom)`` covering ``scale`` of the area with aspect ratio in ``ratio``.

    The Inception-style crop (Szegedy et al., 2015) that ``RandomResizedCrop`` popularised: ten tries at a random
    area and log-uniform aspect ratio, then the largest central crop with a ratio inside ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageClassificationTransform:
    """Turn a batch of ``{"image", "label", "sample_id"}`` rows into ``{"pixel_values", "labels"}`` tensors.

    Use with ``Dataset.set_transform``. With ``train=True`` each image gets a random resized crop to the
    processor's output size and a random horizontal flip, drawn from a generator seeded by
    ``(seed, epoch, sample_id)``; set :attr:`epoch` at the start of every epoch (the trainer callback in
    :mod:`register_adapter.train` does). Without ``train`` the image processor alone resizes (and crops).

    Args:
        image_processor: the model's image processor (PIL backend).
        train: whether to augment.
        seed: seed of the augmentation.
        scale: range of the crop area, as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        flip_probability: probability of a horizontal flip.

    >>> from transformers import ViTImageProcessorPil
    >>> transform = ImageClassificationTransform(ViTImageProcessorPil(size={"height": 30, "width": 30}), train=True)
    >>> batch = {"image": [PIL.Image.new("RGB", (40, 50))], "label": [1], "sample_id": [0]}
    >>> transform(batch)["pixel_values"].shape
    torch.Size([1, 3, 30, 30])
    """

    def __init__(
        self,
        image_processor: Any,
        *,
        train: bool,
        seed: int = 42,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_probability: float = 0.5,
    ) -> None:
        self.image_processor = image_processor
        self.train = train
        self.seed = seed
        self.scale = scale
        self.ratio = ratio
        self.flip_probability = flip_probability
        self.epoch = 0
        self.size = target_size(image_processor)
        self.resample = getattr(image_processor, "resample", None)
        if self.resample is None:
            self.resample = PIL.Image.Resampling.BILINEAR

    def augment(self, image: PIL.Image.Image, sample_id: int) -> PIL.Image.Image:
        """The randomly cropped, resized and flipped ``image``; the same for the same sample id and epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, sample_id])
        box = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        height, width = self.size
        image = image.resize((width, height), resample=self.resample, box=box)
        if rng.uniform() < self.flip_probability:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        # Decoded RGB images are used as they are: a full-size copy per image and step would only cost time.
        images = [image if image.mode == "RGB" else rgb_image(image) for image in batch[IMAGE_COLUMN]]
        if self.train:
            images = [self.augment(image, int(i)) for image, i in zip(images, batch[SAMPLE_ID_COLUMN])]
            pixels = self.image_processor(images=images, do_resize=False, do_center_crop=False, return_tensors="pt")[
                "pixel_values"
            ]
        else:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch[LABEL_COLUMN], dtype=torch.long)}


def apply_transforms(
    splits: datasets.DatasetDict, image_processor: Any, *, seed: int = 42, augment: bool = True
) -> ImageClassificationTransform:
    """Preprocess every split lazily: augment ``train`` (unless ``augment=False``), only resize the others.

    Returns:
        The training transform, whose ``epoch`` the trainer advances.
    """
    train_transform = ImageClassificationTransform(image_processor, train=augment, seed=seed)
    for name, split in splits.items():
        split.set_transform(
            train_transform if name == "train" else ImageClassificationTransform(image_processor, train=False)
        )
    return train_transform

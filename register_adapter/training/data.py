"""Labelled images for classification fine-tuning: loading and validation.

Data comes either from folders in ``imagefolder`` layout (``root/<class name>/<image>``, classes sorted by name) or
from a ``datasets`` dataset (a Hub name, a loading script or a folder written by ``save_to_disk``). Every problem
that would otherwise surface hours into a run is found before training starts and reported as a
:class:`~register_adapter.errors.DataError`: a missing or empty folder, a missing column, a missing or out-of-range
label, a corrupt image (:func:`register_adapter.sources.check_images`).

>>> from register_adapter.training.data import load_image_folder
>>> train = load_image_folder("data/train")  # doctest: +SKIP
>>> train.features["label"].names  # doctest: +SKIP
['cat', 'dog']
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from ..errors import DataError
from ..images import image_extensions
from ..sources import (
    BAD_IMAGE_POLICIES,
    IMAGE_COLUMN,
    MAX_LISTED,
    check_choice,
    image_feature,
    image_files_in,
    load_named_dataset,
)

logger = logging.getLogger(__name__)

LABEL_COLUMN = "label"
SAMPLE_ID_COLUMN = "sample_id"


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
    files = {name: image_files_in(root / name) for name in found}
    with_images = [name for name in found if files[name]]
    if not with_images:
        raise DataError(
            f"Image folder {str(root)!r} holds no image files (looked for {', '.join(sorted(image_extensions())[:8])}, ... "
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
    dataset = image_feature(dataset, image_column, where)
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
    loaded = load_named_dataset(dataset_name, config_name, cache_dir)
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
    rows = ", ".join(str(i) for i in bad[:MAX_LISTED])
    more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
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
        more = f" and {len(single) - MAX_LISTED} more" if len(single) > MAX_LISTED else ""
        raise DataError(
            f"--train_val_split {fraction} cannot hold out validation images of every class: {len(single)} of "
            f"{classes} classes have a single training image ({', '.join(single[:MAX_LISTED])}{more}), and a "
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


def take_samples(dataset: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """``count`` rows drawn at random with ``seed`` (all of them when ``count`` is None or too large).

    Shuffled first, as transformers' example scripts take ``--max_train_samples``: folder rows are sorted by class,
    so the first rows could all be one class.
    """
    if count is None or count >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(count))

"""Where images come from, with no labels needed: files and folders, ``datasets`` datasets, in-memory images.

Neuron search, distillation and diagnostics read unlabelled images; classification training reads labelled ones
(:mod:`register_adapter.training.data`) through the same folder scanner, dataset loader and image checks.

>>> from register_adapter.sources import find_image_files
>>> find_image_files(["photos/"])  # doctest: +SKIP
[PosixPath('photos/a.jpg'), PosixPath('photos/sub/b.png')]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from .errors import DataError
from .images import image_extensions, image_problem

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_CHECKS = ("decode", "header", "none")
MAX_LISTED = 10


def image_files_in(folder: Path) -> list[Path]:
    """The image files anywhere below ``folder``, sorted (see :func:`find_image_files`); empty if there are none."""
    extensions = image_extensions()
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")
    )


def find_image_files(inputs: Sequence[str | os.PathLike], *, check: bool = False) -> list[Path]:
    """The image files among ``inputs``: files as given, folders searched recursively (sorted; hidden files and
    files PIL cannot open as raster images, such as ``README.txt`` or ``notes.pdf``, are skipped).

    Args:
        inputs: Files and folders.
        check: Read every file in full (:func:`~register_adapter.images.check_image`), so an unreadable or truncated
            file stops the run before any model is loaded.

    Raises:
        DataError: a path does not exist, a folder holds no image file, or (with ``check``) a file cannot be read.
    """
    from .images import check_image

    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = image_files_in(path)
            if not found:
                raise DataError(f"Folder '{path}' holds no image files.")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"Image path '{path}' does not exist.")
    if check:
        for path in paths:
            check_image(path)
    return paths


def load_named_dataset(name: str, config_name: str | None, cache_dir: str | None) -> datasets.DatasetDict:
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


def load_unlabelled_images(
    source: Any,
    *,
    image_column: str = IMAGE_COLUMN,
    split: str = "train",
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Unlabelled images as a ``datasets.Dataset`` with one ``image`` column (a ``datasets.Image`` feature).

    Args:
        source: A folder or a list of image files and folders; a ``datasets.Dataset`` (or ``DatasetDict``) with an
            image column; or the name of a ``datasets`` dataset (Hub name, loading script, ``save_to_disk`` folder).
        image_column: The column holding the images (datasets only).
        split: The split to take from a ``DatasetDict`` or a named dataset.
        config_name: Configuration of a named dataset.
        cache_dir: Cache of a named dataset.

    Images are not decoded here (see :func:`check_images`).

    Raises:
        DataError: a path that does not exist, no images, a missing split or column, or a column that holds no
            images.
    """
    if isinstance(source, (str, os.PathLike)):
        from .loading import looks_like_path

        path = Path(source).expanduser()
        if not path.exists() and (not isinstance(source, str) or looks_like_path(source)):
            raise DataError(f"Image path '{source}' does not exist.")
        if not path.exists() or path.is_dir() and _is_saved_dataset(path):
            source = load_named_dataset(os.fspath(source), config_name, cache_dir)
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"The dataset has no split {split!r}. Available splits: {', '.join(source)}.")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return image_column_only(source, image_column, f"the dataset ({len(source)} rows)")
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files = find_image_files(items)
    return datasets.Dataset.from_dict(
        {IMAGE_COLUMN: [str(p) for p in files]}, features=datasets.Features({IMAGE_COLUMN: datasets.Image()})
    )


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def image_column_only(dataset: datasets.Dataset, image_column: str, where: str) -> datasets.Dataset:
    """``dataset`` reduced to its image column, renamed ``image``; file-path columns become ``datasets.Image``.

    Raises:
        DataError: the column does not exist or holds neither images nor file paths.
    """
    if image_column not in dataset.column_names:
        raise DataError(
            f"The image column {image_column!r} does not exist in {where}. "
            f"Available columns: {', '.join(dataset.column_names)}."
        )
    dataset = dataset.select_columns([image_column])
    if image_column != IMAGE_COLUMN:
        dataset = dataset.rename_column(image_column, IMAGE_COLUMN)
    return image_feature(dataset, image_column, where)


def image_feature(dataset: datasets.Dataset, image_column: str, where: str) -> datasets.Dataset:
    """``dataset`` with its ``image`` column as a ``datasets.Image`` feature (file paths are cast).

    Raises:
        DataError: the column holds neither images nor file paths.
    """
    feature = dataset.features[IMAGE_COLUMN]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return dataset.cast_column(IMAGE_COLUMN, datasets.Image())  # a column of file paths
    if not isinstance(feature, datasets.Image):
        raise DataError(
            f"The image column {image_column!r} in {where} holds {feature!r}, not images. "
            "Expected a datasets.Image feature or file paths."
        )
    return dataset


def _stored_image_problem(value: dict[str, Any], check: str) -> str | None:
    """:func:`~register_adapter.images.image_problem` of an undecoded ``datasets.Image`` value (bytes or path)."""
    source = value["bytes"] if value.get("bytes") is not None else value.get("path")
    return "no bytes and no path" if source is None else image_problem(source, check)


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
    the result (see :func:`register_adapter.training.runtime.check_images_once`).
    """
    check_choice("image_check", check, IMAGE_CHECKS)
    if check == "none" or len(dataset) == 0:
        return {}
    raw = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    problems = raw.map(
        lambda images: {"_problem": [_stored_image_problem(image, check) for image in images]},
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
    return drop_unreadable_in_splits({split: dataset}, {split: problems}, on_bad_image=on_bad_image)[split]


def drop_unreadable_in_splits(
    splits: dict[str, datasets.Dataset], problems: dict[str, dict[int, str]], *, on_bad_image: str = "error"
) -> dict[str, datasets.Dataset]:
    """Apply the ``on_bad_image`` policy to the unreadable images of every split at once (``problems`` by split, as
    :func:`find_unreadable_images` finds them), so that one error lists the bad files of all splits.

    Returns:
        The splits, without the unreadable images when ``on_bad_image="skip"``.

    Raises:
        DataError: with ``"error"``, a split holds unreadable images; with ``"skip"``, no image of a split can be
            read. The message lists them for every split.
    """
    check_choice("on_bad_image", on_bad_image, BAD_IMAGE_POLICIES)
    kept, refused, empty = dict(splits), [], []
    for split, dataset in splits.items():
        bad = sorted(problems.get(split) or {})
        if not bad:
            continue
        raw = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
        names = [raw[i][IMAGE_COLUMN].get("path") or f"row {i}" for i in bad[:MAX_LISTED]]
        listing = "; ".join(f"{name} ({problems[split][i]})" for name, i in zip(names, bad))
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        if on_bad_image == "error" or len(bad) == len(dataset):
            refused.append(f"{len(bad)} of {len(dataset)} {split} images cannot be read: {listing}{more}.")
            empty += [split] if len(bad) == len(dataset) else []
            continue
        logger.warning(
            "Skipping %d of %d %s images that cannot be read: %s%s", len(bad), len(dataset), split, listing, more
        )
        kept[split] = dataset.select([i for i in range(len(dataset)) if i not in problems[split]])
    if refused:
        if on_bad_image == "error":
            hint = "Remove or replace them, or pass --on_bad_image skip to leave them out."
        else:
            hint = (
                "No image of this split can be read."
                if len(splits) == 1
                else (f"No image of the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} can be read.")
            )
        raise DataError(f"{' '.join(refused)} {hint}")
    return kept

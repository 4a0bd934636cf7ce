"""The teacher-target cache: the denoised targets of every image computed once, kept on disk as Arrow files.

The teacher runs ``num_views`` forward passes per image, the student one forward and backward pass: without a cache
the teacher dominates every step, with it only the first pass over the data pays for it. The views of an image are
then drawn once (from the seed and the image's index) rather than at every step, and the images are the fixed crops
of the image processor.

A cache lives in a folder named by a key over everything the targets depend on: the images (the dataset's
fingerprint and size), the processor's class and settings (:func:`processor_settings`), the teacher's weights and settings (see
:meth:`~register_adapter.methods.distillation.DenoisedTeacher.fingerprint`), the seed, the mixed precision and the
stored dtype. Another model, other settings or other images give another folder, so a stale cache is never read;
each row also keeps a hash of the pixels its targets came from, checked when it is read. The targets are written in
chunks of :data:`CHUNK_SIZE` images, each file atomically, so an interrupted computation resumes with the missing
chunks; under DDP every process computes its share of the chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from ...errors import InvalidConfigError
from .data import PIXEL_DIGEST, TARGETS, DistillationImages, pixel_digest, view_rng
from .teacher import DenoisedTeacher

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
CHUNK_SIZE = 256


def default_cache_dir() -> Path:
    """``register_adapter/distillation_targets`` in the ``datasets`` cache (``HF_DATASETS_CACHE``)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "register_adapter" / "distillation_targets"


def processor_settings(processor: Any) -> str:
    """The class and every setting of an image processor (its ``to_json_string()``), for cache keys: equal for two
    instances with the same settings, different when any setting differs.

    Raises:
        InvalidConfigError: the processor has no ``to_json_string()``; its ``repr`` could hold a memory address (the
            cache would never be reused) or leave settings out (a stale cache would be read).
    """
    to_json = getattr(processor, "to_json_string", None)
    kind = type(processor)
    if not callable(to_json):
        raise InvalidConfigError(
            f"cache_targets keys the target cache on the image processor's settings, but {kind.__name__} has no "
            "to_json_string() to read them from (transformers image processors have one). Pass a transformers image "
            "processor, or leave out --cache_targets."
        )
    return f"{kind.__module__}.{kind.__qualname__} {to_json()}"


def cache_key(data: DistillationImages, teacher: DenoisedTeacher, *, seed: int, dtype: str, precision: str) -> str:
    """The name of the cache folder of ``data``'s targets under ``teacher`` (see the module docstring)."""
    fields = {
        "version": CACHE_VERSION,
        "images": data.images._fingerprint,
        "rows": len(data),
        "size": list(data.size),
        "processor": processor_settings(data.processor),
        "teacher": teacher.fingerprint(),
        "seed": seed,
        "dtype": dtype,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def target_features(grid: tuple[int, int], hidden_size: int, dtype: str) -> datasets.Features:
    return datasets.Features(
        {TARGETS: datasets.Array3D(shape=(*grid, hidden_size), dtype=dtype), PIXEL_DIGEST: datasets.Value("string")}
    )


def cached_targets(
    data: DistillationImages,
    teacher: DenoisedTeacher,
    folder: Path,
    *,
    seed: int,
    dtype: str,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> datasets.Dataset:
    """The targets of every image of ``data``, one row each (``targets`` (h, w, D) and ``pixel_digest``), read from
    ``folder`` and computed where missing: chunk ``k`` by process ``k mod num_processes``.

    Args:
        data: The images.
        teacher: The teacher (its model on the device to compute on).
        folder: The cache folder (see :func:`cache_key`).
        seed: Seed of the views (see :func:`~register_adapter.methods.distillation.data.view_rng`).
        dtype: Stored precision, ``"float16"`` or ``"float32"``.
        batch_size: Images per teacher call.
        process_index, num_processes: This process and how many share the work.
        num_workers: Data-loader workers that read and preprocess the images.
        autocast: Context of the teacher's forward passes (the run's mixed precision).
        wait_for_everyone: A barrier across the processes, passed once every process wrote its chunks.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [folder / f"targets-{k:05d}.arrow" for k in range(math.ceil(len(data) / CHUNK_SIZE))]
    mine = [k for k in range(process_index, len(chunks), num_processes) if not chunks[k].exists()]
    if mine:
        logger.info("Computing the teacher's targets of %d chunks of images into %s", len(mine), folder)
    elif process_index == 0:
        logger.info("Reading the teacher's targets from %s", folder)
    features = target_features(data.grid, teacher.tower.hidden_size, dtype)
    for k in mine:
        rows = range(k * CHUNK_SIZE, min((k + 1) * CHUNK_SIZE, len(data)))
        _write_chunk(data, teacher, rows, chunks[k], features, seed, batch_size, num_workers, autocast)
    wait_for_everyone()
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in chunks])


def _write_chunk(
    data: DistillationImages,
    teacher: DenoisedTeacher,
    rows: range,
    path: Path,
    features: datasets.Features,
    seed: int,
    batch_size: int,
    num_workers: int,
    autocast: Callable[[], Any],
) -> None:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, rows), batch_size=batch_size, num_workers=num_workers
    )
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    dtype = features[TARGETS].dtype
    with ArrowWriter(features=features, path=str(partial)) as writer:
        for batch in tqdm(loader, desc=f"Teacher targets, {path.name}", leave=False):
            rngs = [view_rng(seed, int(i)) for i in batch["sample_id"]]
            with autocast():
                targets = teacher(batch["pixel_values"], rngs=rngs)  # (b, h, w, D)
            writer.write_batch(
                {
                    TARGETS: list(targets.cpu().numpy().astype(dtype)),
                    PIXEL_DIGEST: [pixel_digest(pixels) for pixels in batch["pixel_values"]],
                }
            )
        writer.finalize()
    os.replace(partial, path)  # whole files only: an interrupted chunk is computed again

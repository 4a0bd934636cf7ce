"""Adapter files on disk: atomic saves, and checks of the files before they are loaded.

Only safetensors are written and read: a pickled ``adapter_model.bin`` can run code when it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from typing import Any

from .errors import AdapterFilesError, InvalidConfigError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
STALE_SAVE_PREFIX = ".saving-"
SAFETENSORS_ONLY = (
    "Register adapters are saved as safetensors only (adapter_model.safetensors): a pickled adapter_model.bin can run "
    "code when it is loaded. Leave safe_serialization at its default (True)."
)


def atomic_save(save_directory: str | os.PathLike, save: Any, **kwargs: Any) -> None:
    """Run ``save(tmp_dir, **kwargs)`` into a temporary folder inside ``save_directory``, then move its files into
    place, so that an interrupted save leaves the previous adapter readable.

    An adapter is two files (config and weights) that must come from one save, and no single rename replaces both.
    So before the first move, the files about to be replaced are kept in a journal folder (hard links) with the list
    of files that are new; it is complete before anything is moved. When every file is in place the journal is
    removed. If the save stops between its moves, the journal puts the previous files back and removes the new ones:
    at once on an error, and after a kill at the next save into the folder or the next load of the adapter
    (:func:`recover_interrupted_saves`).

    Raises:
        InvalidConfigError: ``safe_serialization=False`` (register adapters are only saved as safetensors).
    """
    if kwargs.get("safe_serialization", True) is False:
        raise InvalidConfigError(SAFETENSORS_ONLY)
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    recover_interrupted_saves(save_directory)
    prefix = f"{STALE_SAVE_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=prefix) as tmp:
        save(tmp, **kwargs)
        # The config goes last: a loader never sees a new config next to old weights, even without the journal.
        files = sorted(
            (os.path.relpath(os.path.join(root, name), tmp) for root, _, names in os.walk(tmp) for name in names),
            key=lambda path: (os.path.basename(path) == "adapter_config.json", path),
        )
        journal = _write_journal(save_directory, files, f"{tmp}{JOURNAL_SUFFIX}")
        try:
            for path in files:
                target = os.path.join(save_directory, path)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(os.path.join(tmp, path), target)
        except BaseException:
            _roll_back(save_directory, journal)
            raise
        _discard(journal)


JOURNAL_SUFFIX = ".previous"
DISCARDED_SUFFIX = ".discarded"
CREATED_LIST = "created.json"


def _discard(journal: str) -> None:
    """Remove ``journal``. It is renamed first, in one step: a removal stopped half-way must not leave a journal that
    a later recovery would roll back with some of its files gone."""
    discarded = journal.removesuffix(JOURNAL_SUFFIX) + DISCARDED_SUFFIX
    os.rename(journal, discarded)
    shutil.rmtree(discarded)


def _write_journal(save_directory: str, files: list[str], journal: str) -> str:
    """Keep the files of ``save_directory`` that ``files`` will replace in the folder ``journal`` (hard links, copies
    where the file system has none), with the list of the ``files`` that are new. The journal appears under its name
    only once complete."""
    partial = f"{journal}-partial"
    os.makedirs(partial)
    created = []
    for path in files:
        current = os.path.join(save_directory, path)
        if not os.path.isfile(current):
            created.append(path)
            continue
        kept = os.path.join(partial, "files", path)
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        try:
            os.link(current, kept)
        except OSError:
            shutil.copy2(current, kept)
    with open(os.path.join(partial, CREATED_LIST), "w") as handle:
        json.dump(created, handle)
    os.rename(partial, journal)
    return journal


def _roll_back(save_directory: str, journal: str) -> None:
    """Put the files kept in ``journal`` back into ``save_directory`` and remove the files the save created."""
    with open(os.path.join(journal, CREATED_LIST)) as handle:
        created = json.load(handle)
    for path in created:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(save_directory, path))
    kept = os.path.join(journal, "files")
    for root, _, names in os.walk(kept):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), kept)
            os.replace(os.path.join(kept, path), os.path.join(save_directory, path))
    _discard(journal)


def recover_interrupted_saves(folder: str | os.PathLike) -> None:
    """Finish what saves into ``folder`` left behind when their process was killed (on this host): put the previous
    adapter back where a save stopped between its moves, and remove their temporary folders. Saves whose process
    still runs are left alone."""
    folder = os.fspath(folder)
    host = socket.gethostname()
    found = []
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{re.escape(STALE_SAVE_PREFIX)}(.+)-(\d+)-[^-]+(?:-partial)?", name)
        if match is not None and match[1] == host and not _process_runs(int(match[2])):
            found.append(name)
    for name in sorted(found, key=lambda name: not name.endswith(JOURNAL_SUFFIX)):  # journals first
        path = os.path.join(folder, name)
        if name.endswith(JOURNAL_SUFFIX):
            logger.warning("Restoring the adapter in %s that a killed save had begun to replace.", folder)
            _roll_back(folder, path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_adapter_weights(
    path_or_repo_id: str, subfolder: str | None = None, config: Any = None, **hub_kwargs
) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the weights in ``adapter_model.safetensors``, after checking that its header can be read
    and, given the ``config`` saved with it, that its registers have the shape that config describes."""
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    folder = os.path.join(path_or_repo_id, subfolder) if subfolder else path_or_repo_id
    if os.path.isdir(folder):
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            found = sorted(os.listdir(folder))
            advice = "Save the adapter again with model.save_pretrained(folder)."
            if PICKLED_WEIGHTS_NAME in found:
                advice = (
                    f"{PICKLED_WEIGHTS_NAME} is a pickle, which register_adapter does not load (unpickling can run "
                    "code). Save the adapter again with model.save_pretrained(folder), which writes safetensors."
                )
            raise AdapterFilesError(f"{weights} is missing: the adapter folder holds only {found}. {advice}")
    else:
        allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
        try:
            weights = hf_hub_download(path_or_repo_id, WEIGHTS_NAME, subfolder=subfolder, **allowed)
        except Exception as error:
            raise AdapterFilesError(
                f"Could not get {WEIGHTS_NAME} of {path_or_repo_id!r}: {error}. Check the repository id and, offline, "
                "that the adapter is in the Hugging Face cache."
            ) from error
    try:
        with safe_open(weights, framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except Exception as error:
        raise AdapterFilesError(
            f"{weights} is not a readable safetensors file ({error}). It is corrupted or incomplete: "
            "download or save the adapter again."
        ) from error
    if config is not None and config.hidden_size is not None:
        expected = (1, config.num_register_tokens, config.hidden_size)
        for key, shape in shapes.items():
            if key.endswith("register_tokens") and shape != expected:
                raise AdapterFilesError(
                    f"{weights} holds registers of shape {list(shape)} ({key}), but its adapter_config.json says "
                    f"{config.num_register_tokens} registers of width {config.hidden_size}: the two files come from "
                    "different saves. Save the adapter again."
                )
    return shapes

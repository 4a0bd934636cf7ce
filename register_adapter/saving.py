"""Adapter files on disk: atomic saves, and checks of the files before they are loaded.

Only safetensors are written and read: a pickled ``adapter_model.bin`` can run code when it is loaded.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from typing import Any

from .errors import AdapterFilesError, InvalidConfigError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
STALE_SAVE_PREFIX = ".saving-"
SAFETENSORS_ONLY = (
    "Register adapters are saved as safetensors only (adapter_model.safetensors): a pickled adapter_model.bin can run "
    "code when it is loaded. Leave safe_serialization at its default (True)."
)


def atomic_save(save_directory: str | os.PathLike, save: Any, **kwargs: Any) -> None:
    """Run ``save(tmp_dir, **kwargs)`` into a temporary folder inside ``save_directory``, then move each file into
    place with ``os.replace``, the config last: an interrupted save leaves the previous adapter files as they were.

    Raises:
        InvalidConfigError: ``safe_serialization=False`` (register adapters are only saved as safetensors).
    """
    if kwargs.get("safe_serialization", True) is False:
        raise InvalidConfigError(SAFETENSORS_ONLY)
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    _remove_killed_saves(save_directory)
    prefix = f"{STALE_SAVE_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=prefix) as tmp:
        save(tmp, **kwargs)
        for root, _, files in os.walk(tmp):
            relative = os.path.relpath(root, tmp)
            target_dir = os.path.normpath(os.path.join(save_directory, relative))
            os.makedirs(target_dir, exist_ok=True)
            # The config goes last so that a loader never sees a new config next to old weights.
            for name in sorted(files, key=lambda n: n == "adapter_config.json"):
                os.replace(os.path.join(root, name), os.path.join(target_dir, name))


def _remove_killed_saves(save_directory: str) -> None:
    """Remove the temporary folders of saves into ``save_directory`` whose process, on this host, no longer runs."""
    host = socket.gethostname()
    for name in os.listdir(save_directory):
        found = re.fullmatch(rf"{re.escape(STALE_SAVE_PREFIX)}(.+)-(\d+)-[^-]+", name)
        if found is None or found[1] != host or _process_runs(int(found[2])):
            continue
        shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)


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

"""Loading a model and its image processor by name, for every command: a Hub id or a folder, a built-in tiny model,
or a model with planted artifacts.

>>> from register_adapter.loading import load_model
>>> model, processor = load_model("tiny-vit")
>>> type(model).__name__, processor.size["height"]
('ViTModel', 30)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from .errors import (
    AdapterFilesError,
    AdapterMismatchError,
    DroppedModulesWarning,
    InvalidConfigError,
    RegisterAdapterError,
    UnsupportedModelError,
)

logger = logging.getLogger(__name__)

PLANTED_PREFIX = "planted:"
#: Sizes of the ``planted:<family>`` models the commands load: 224 px images, 8 px patches (a 28 x 28 grid).
PLANTED_SIZES = {"image_size": 224, "patch_size": 8}
TASKS = ("base", "classification")


def first_line(error: BaseException) -> str:
    """The first line of an error message, ending with a full stop."""
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else type(error).__name__
    return line if line.endswith((".", "!", "?")) else line + "."


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a Hub id (``name`` or ``org/name``)."""
    return name.startswith(("/", ".", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1


def _labels_kwargs(labels: list[str] | None) -> dict[str, Any]:
    if labels is None:
        return {}
    id2label = dict(enumerate(labels))
    return {"num_labels": len(labels), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def load_model(
    name: str,
    task: str = "base",
    *,
    labels: list[str] | None = None,
    adapter: str | None = None,
    revision: str = "main",
    cache_dir: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    ignore_mismatched_sizes: bool = True,
) -> tuple[nn.Module, Any]:
    """The model ``name`` for ``task`` and its image processor (PIL backend: no torchvision needed).

    Args:
        name: A Hub id or a folder saved with ``save_pretrained``; a built-in tiny model (``tiny-vit``, ... see
            :mod:`register_adapter.tiny`); or ``planted:<family>``, a model with planted artifacts
            (:func:`register_adapter.testing.make_artifact_model` at :data:`PLANTED_SIZES`).
        task: ``"base"`` (``AutoModel``) or ``"classification"`` (``AutoModelForImageClassification``, with a head for
            ``labels``).
        labels: Class names of a new classification head.
        adapter: A register adapter (folder or Hub id) to load on top, as a ``PeftModel``.
        revision, cache_dir, attn_implementation, trust_remote_code: As in ``from_pretrained``.
        ignore_mismatched_sizes: Replace a pretrained classification head whose size does not fit ``labels``.

    Raises:
        InvalidConfigError: the model cannot be loaded (no such folder, not on the Hub or in the cache, not a model).
        UnsupportedModelError: transformers has no image-classification model for this family (``task=
            "classification"``), or the family cannot take registers.
        AdapterFilesError: the adapter cannot be loaded.
    """
    import transformers

    from .pixels import default_processor
    from .tiny import TINY_MODELS, build_tiny_model

    if task not in TASKS:
        raise InvalidConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    label_kwargs = _labels_kwargs(labels)
    if name.startswith(PLANTED_PREFIX):
        from .testing import make_artifact_model

        if task != "base":
            raise InvalidConfigError(f"{name} is a base model with planted artifacts; it has no {task} variant.")
        planted = make_artifact_model(name[len(PLANTED_PREFIX) :], **PLANTED_SIZES)
        model, processor = planted.model, planted.processor
    elif name in TINY_MODELS:
        model = build_tiny_model(name, task, **label_kwargs)
        processor = default_processor(_tower(model))
    else:
        model = _from_pretrained(
            name,
            task,
            label_kwargs,
            revision=revision,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
        )
        hub_kwargs = {"revision": revision, "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(name, backend="pil", **hub_kwargs)
        except (OSError, ValueError):
            processor = default_processor(_tower(model))
            logger.warning(
                "No image processor found for %s; resizing to %dx%d px (height x width), mean = std = 0.5.",
                name,
                processor.size["height"],
                processor.size["width"],
            )
    if adapter is not None:
        model = load_adapter(model, adapter, need_heads=task == "classification")
    return model, processor


def _tower(model: nn.Module) -> Any:
    from .architectures import find_vision_tower

    return find_vision_tower(model)


def check_model(
    name: str, *, revision: str = "main", cache_dir: str | None = None, trust_remote_code: bool = False
) -> None:
    """Raise the error :func:`load_model` would raise for a model ``name`` that cannot be found, reading its config
    only (a command checks ``--model`` before it loads data).

    Raises:
        InvalidConfigError: no such folder, not on the Hub or in the cache, not a model.
    """
    from .tiny import TINY_MODELS

    if not name.startswith(PLANTED_PREFIX) and name not in TINY_MODELS:
        _config(name, {}, revision=revision, cache_dir=cache_dir, trust_remote_code=trust_remote_code)


def _config(name: str, label_kwargs: dict[str, Any], **hub_kwargs: Any) -> Any:
    import transformers

    try:
        if looks_like_path(name) and not Path(name).expanduser().exists():
            raise FileNotFoundError("no such folder")
        return transformers.AutoConfig.from_pretrained(name, **label_kwargs, **hub_kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise InvalidConfigError(
            f"Cannot load model '{name}': {first_line(error)} Give a folder saved with save_pretrained, a Hub id, a "
            "built-in tiny model (tiny-vit, ...) or planted:<family>."
        ) from error


def _from_pretrained(name: str, task: str, label_kwargs: dict[str, Any], **kwargs: Any) -> nn.Module:
    import transformers

    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "trust_remote_code")}
    config = _config(name, label_kwargs, **hub_kwargs)
    auto = transformers.AutoModel if task == "base" else transformers.AutoModelForImageClassification
    options = {"attn_implementation": kwargs["attn_implementation"]}
    if task == "classification":
        options["ignore_mismatched_sizes"] = kwargs["ignore_mismatched_sizes"]
    try:
        return auto.from_pretrained(name, config=config, **options, **hub_kwargs)
    except ValueError as error:
        if task == "classification" and "Unrecognized configuration class" in str(error):
            raise UnsupportedModelError(
                f"{name!r} (model_type={config.model_type!r}) has no image-classification model in transformers, so "
                "no classification head can be trained on it."
            ) from error
        raise InvalidConfigError(f"Cannot load model '{name}': {first_line(error)}") from error
    except (OSError, KeyError) as error:
        raise InvalidConfigError(f"Cannot load model '{name}': {first_line(error)}") from error


def load_adapter(model: nn.Module, adapter: str, *, need_heads: bool = False) -> nn.Module:
    """``PeftModel.from_pretrained(model, adapter)`` with one clear error for an adapter that cannot be loaded.

    Args:
        model: The base model.
        adapter: A folder or Hub id.
        need_heads: Refuse an adapter whose saved heads (``modules_to_save``) ``model`` has no place for, rather than
            loading it without them (with a :class:`~register_adapter.DroppedModulesWarning`).

    Raises:
        AdapterFilesError: no such folder, not on the Hub or in the cache, or no adapter files in it.
        RegisterAdapterError: the adapter does not fit the model (see :class:`~register_adapter.AdapterMismatchError`).
    """
    from peft import PeftModel

    try:
        if looks_like_path(adapter) and not Path(adapter).expanduser().exists():
            raise FileNotFoundError("no such folder")
        with warnings.catch_warnings():
            if need_heads:
                warnings.simplefilter("error", DroppedModulesWarning)
            return PeftModel.from_pretrained(model, adapter)
    except DroppedModulesWarning as warning:
        raise AdapterMismatchError(f"{adapter} has no trained head for a classifier: {warning}") from warning
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if isinstance(error, RegisterAdapterError):
            raise
        raise AdapterFilesError(
            f"Cannot load adapter '{adapter}': {first_line(error)} Give a folder saved with save_pretrained "
            "(adapter_config.json and the weights) or a Hub id."
        ) from error

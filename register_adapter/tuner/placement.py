"""Where the saved state of a register adapter goes in the model it is loaded into.

Registers, LoRA and every other piece of adapter state belong to the vision tower, not to the class around it: saved
from ``Dinov2ForImageClassification`` (tower at ``dinov2``), they load into ``Dinov2Model`` (tower at ``""``) after
:func:`move_tower_keys`. Heads saved through ``modules_to_save`` stay where they were, and are left out where the model
has no place for them (:func:`keep_saved_modules`); with class names in the config they size the model's head
(:func:`size_heads`).
"""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import _get_submodules
from torch import nn

from ..architectures import VisionTower
from ..errors import AdapterMismatchError
from ..peft_integration import PEFT_PREFIX
from .config import RegisterConfig


def move_tower_keys(state_dict: dict[str, Any], source: str, target: str) -> dict[str, Any]:
    """``state_dict`` with every key under the tower path ``source`` moved under ``target`` (``""``: the model is the
    tower). Keys may carry PEFT's ``base_model.model.`` prefix; keys of ``modules_to_save`` copies already name the
    target's modules and are left as they are.

    >>> move_tower_keys({"base_model.model.dinov2.embeddings.register_tokens": 0, "base_model.model.classifier.weight": 1},
    ...                 "dinov2", "")
    {'base_model.model.embeddings.register_tokens': 0, 'base_model.model.classifier.weight': 1}
    """
    moved = {}
    for key, value in state_dict.items():
        prefix = PEFT_PREFIX if key.startswith(PEFT_PREFIX) else ""
        path = key[len(prefix) :]
        if ".modules_to_save." not in key and (not source or path.startswith(f"{source}.")):
            inside = path[len(source) + 1 :] if source else path
            path = f"{target}.{inside}" if target else inside
        moved[f"{prefix}{path}"] = value
    return moved


def check_movable(model: nn.Module, tower: VisionTower, config: RegisterConfig) -> None:
    """Refuse to move an adapter whose ``modules_to_save`` lie inside the vision tower to a model whose tower sits at
    another path: PEFT looks their weights up under this model's path before they can be moved.

    Raises:
        AdapterMismatchError: a module of ``config.modules_to_save`` is inside the tower.
    """
    inside = [
        path
        for path, _ in model.named_modules()
        if any(path.endswith(name) for name in config.modules_to_save or [])
        and (not tower.path or path.startswith(f"{tower.path}."))
    ]
    if inside:
        raise AdapterMismatchError(
            f"This adapter trains modules inside the vision tower ({', '.join(inside)}, modules_to_save) and was saved "
            f"from a model whose tower is at {config.tower_path!r}; in {type(model).__name__} it is at "
            f"{tower.path!r}. Load it into a model of the class it was saved from."
        )


def keep_saved_modules(model: nn.Module, config: RegisterConfig) -> None:
    """For an adapter read from files, keep in ``modules_to_save`` only modules whose weights the files hold.

    PEFT copies every module whose path ends with a name in ``modules_to_save`` and looks its saved weights up under
    that path, so a module without saved weights (``cls_classifier`` in ``DeiTForImageClassificationWithTeacher``
    ends with the ``classifier`` of ``DeiTForImageClassification``) would fail the lookup. When no matching module has
    saved weights, ``modules_to_save`` is emptied: the saved modules have no place in the model and are dropped with a
    :class:`~register_adapter.errors.DroppedModulesWarning` when the weights are loaded.

    Raises:
        AdapterMismatchError: some, but not all, of the matching modules have saved weights.
    """
    saved = getattr(config, "_saved_keys", None)
    if saved is None or not config.modules_to_save:
        return
    matched = {
        path: getattr(module, "original_module", module)  # a module already copied for another adapter
        for path, module in model.named_modules()
        if path and any(path.endswith(name) for name in config.modules_to_save)
    }
    held = [path for path, module in matched.items() if all(f"{path}.{key}" in saved for key in module.state_dict())]
    if not held:
        config._dropped_modules, config.modules_to_save = list(config.modules_to_save), None
    elif len(held) < len(matched):
        lacking = sorted(set(matched) - set(held))
        raise AdapterMismatchError(
            f"The adapter's modules_to_save {config.modules_to_save} match {sorted(matched)} in "
            f"{type(model).__name__}, but its files hold weights only for {held}, not for {lacking}. Load it into a "
            "model of the class it was saved from."
        )


def size_heads(model: nn.Module, modules_to_save: list[str], labels: list[str]) -> None:
    """Give every ``nn.Linear`` among ``modules_to_save`` (the classification heads) one output per label, and
    ``model.config`` the labels.

    A head of another size is replaced by a new ``nn.Linear``, as ``from_pretrained(..., num_labels=len(labels),
    ignore_mismatched_sizes=True)`` would do; the adapter's trained head is then loaded over it.
    """
    heads = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(path.endswith(name) for name in modules_to_save)
    ]
    for path, module in heads:
        if module.out_features != len(labels):
            parent, _, name = _get_submodules(model, path)
            new = nn.Linear(module.in_features, len(labels), bias=module.bias is not None)
            setattr(parent, name, new.to(device=module.weight.device, dtype=module.weight.dtype))
    config = getattr(model, "config", None)
    if heads and config is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: index for index, label in enumerate(labels)}

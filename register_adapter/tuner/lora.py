"""LoRA on the attention projections of the vision tower, carried inside a register adapter.

One ``PeftModel`` holds one PEFT type, and a LoRA adapter cannot carry register tokens (they are not a module of the
base model that ``modules_to_save`` could copy). So a :class:`~register_adapter.RegisterConfig` with ``lora_r > 0``
also wraps the chosen ``nn.Linear`` layers of the tower's blocks in PEFT's own ``lora.Linear``; registers, LoRA and
``modules_to_save`` are then saved, loaded, enabled, disabled and switched together as one adapter.
"""

from __future__ import annotations

import re

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..errors import InvalidConfigError


def lora_config(config) -> LoraConfig:
    """The ``LoraConfig`` that PEFT's LoRA layers read for a register config with ``lora_r > 0``."""
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
    )


def lora_pattern(layers_path: str, names: list[str] | tuple[str, ...]) -> str:
    """Regex of the modules named ``names`` anywhere inside the blocks at ``layers_path``."""
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"{re.escape(layers_path)}\.\d+\.(?:.*\.)?(?:{alternatives})"


def check_lora_targets(tower, names: list[str] | tuple[str, ...]) -> None:
    """Check that every name in ``names`` (the last dotted parts of a module path) names ``nn.Linear`` layers, and
    only those, in the tower's first block (a layer wrapped in LoRA by another adapter counts as its linear layer).

    Raises:
        InvalidConfigError: a name matches no layer, or a layer that is not an ``nn.Linear``; the message lists the
            block's linear layers.
    """
    found = dict(tower.blocks[0].named_modules())
    wrapped = [path for path, module in found.items() if isinstance(module, LoraLayer)]  # by an earlier adapter
    modules = {
        path: module.get_base_layer() if path in wrapped else module
        for path, module in found.items()
        if not any(path.startswith(f"{outer}.") for outer in wrapped)
    }
    linear = sorted({path.rsplit(".", 1)[-1] for path, module in modules.items() if isinstance(module, nn.Linear)})
    for name in names:
        matched = [module for path, module in modules.items() if path == name or path.endswith(f".{name}")]
        others = sorted({type(module).__name__ for module in matched if not isinstance(module, nn.Linear)})
        if not matched or others:
            found = f"matches {', '.join(others)}, not nn.Linear" if matched else "matches no layer"
            raise InvalidConfigError(
                f"lora_target_modules entry {name!r} {found} in the blocks of {type(tower.module).__name__}: LoRA "
                f"inside a register adapter wraps linear layers. Its blocks have these: {linear}."
            )


def add_lora(target: nn.Module, adapter_name: str, config, current_key: str) -> nn.Module | None:
    """Wrap ``target`` in a LoRA layer for ``adapter_name``, or add the adapter to an existing LoRA layer.

    ``target`` is an ``nn.Linear`` (see :func:`check_lora_targets`).

    Returns:
        The new module to put in place of ``target``, or ``None`` when ``target`` already was a LoRA layer.
    """
    settings = lora_config(config)
    if isinstance(target, LoraLayer):
        target.update_layer(
            adapter_name, config.lora_r, lora_alpha=config.lora_alpha, config=settings, target_name=current_key
        )
        return None
    return LoraLinear(
        target, adapter_name, config=settings, r=config.lora_r, lora_alpha=config.lora_alpha, target_name=current_key
    )

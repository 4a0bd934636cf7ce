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

from .errors import InvalidConfigError


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


def add_lora(target: nn.Module, adapter_name: str, config, current_key: str) -> nn.Module | None:
    """Wrap ``target`` in a LoRA layer for ``adapter_name``, or add the adapter to an existing LoRA layer.

    Returns:
        The new module to put in place of ``target``, or ``None`` when ``target`` already was a LoRA layer.

    Raises:
        InvalidConfigError: ``target`` is not an ``nn.Linear``.
    """
    settings = lora_config(config)
    if isinstance(target, LoraLayer):
        target.update_layer(
            adapter_name, config.lora_r, lora_alpha=config.lora_alpha, config=settings, target_name=current_key
        )
        return None
    if not isinstance(target, nn.Linear):
        raise InvalidConfigError(
            f"lora_target_modules matched {current_key} ({type(target).__name__}), but LoRA inside a register adapter "
            "wraps nn.Linear layers only. Name linear layers, e.g. ['q_proj', 'v_proj']."
        )
    return LoraLinear(
        target, adapter_name, config=settings, r=config.lora_r, lora_alpha=config.lora_alpha, target_name=current_key
    )

"""The tuner: finds the vision tower, wraps its embeddings, and registers the PEFT method."""

from __future__ import annotations

import os
import re
from typing import Any

import peft
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_submodules
from torch import nn
from transformers.backbone_utils import BackboneMixin

from .architectures import find_vision_tower
from .config import REGISTERS, RegisterConfig
from .errors import AdapterMismatchError, MergeNotSupportedError
from .layer import MERGE_MESSAGE, RegisterLayer
from .lora import add_lora, lora_pattern

PREFIX = "register_tokens"


class RegisterModel(BaseTuner):
    """Adds register tokens to a vision transformer (https://arxiv.org/abs/2309.16588).

    Created by ``peft.get_peft_model(model, RegisterConfig(...))`` or :func:`add_registers`; not used directly.
    """

    prefix: str = PREFIX
    # Register layers and, with ``lora_r > 0``, PEFT's LoRA layers: both are switched, disabled and deleted together.
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: RegisterConfig, model_config: dict) -> RegisterConfig:
        tower = find_vision_tower(self.model)
        for field, found in (("family", tower.spec.name), ("hidden_size", tower.hidden_size)):
            expected = getattr(peft_config, field)
            if expected is not None and expected != found:
                raise AdapterMismatchError(
                    f"This adapter was made for {field}={expected!r}, but the model has {field}={found!r} "
                    f"({type(self.model).__name__}). Load it into a model of the same family and size."
                )
        peft_config.family = tower.spec.name
        peft_config.hidden_size = tower.hidden_size
        peft_config.target_modules = re.escape(tower.key(tower.spec.embeddings))
        if peft_config.lora_r:
            lora = lora_pattern(tower.key(tower.spec.layers), peft_config.lora_target_modules)
            peft_config.target_modules = f"{peft_config.target_modules}|{lora}"
        return peft_config

    def _create_and_replace(
        self,
        peft_config: RegisterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        tower = find_vision_tower(self.model)
        if current_key != tower.key(tower.spec.embeddings):
            new_lora = add_lora(target, adapter_name, peft_config, current_key)
            if new_lora is not None:
                if adapter_name not in self.active_adapters:
                    new_lora.requires_grad_(False)
                self._replace_module(parent, target_name, new_lora, target)
            return
        if isinstance(target, RegisterLayer):
            target.update_layer(adapter_name, peft_config)
            return
        is_backbone = isinstance(self.model, BackboneMixin)
        new_module = RegisterLayer(target, adapter_name, peft_config, tower, is_backbone=is_backbone)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Registers are cast to the dtype of the sequence in forward; keeping them as created avoids a bf16 model
        # silently getting fp32 registers that no longer match what was saved.
        return None

    def _check_merge_allowed(self) -> None:
        raise MergeNotSupportedError(MERGE_MESSAGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise MergeNotSupportedError(MERGE_MESSAGE)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        for key, module in list(self.model.named_modules()):
            if isinstance(module, RegisterLayer):
                module.remove_hooks()
                parent, _, target_name = _get_submodules(self.model, key)
                setattr(parent, target_name, module.base_layer)
        # LoRA layers go back to their base layers, a ModulesToSaveWrapper to its trained copy.
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def register_peft_type() -> None:
    """Make ``REGISTERS`` known to PEFT's lookups (idempotent; done when ``register_adapter`` is imported).

    PEFT's ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so the three mappings that
    every lookup goes through are filled directly.
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[REGISTERS] = RegisterConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[REGISTERS] = RegisterModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[REGISTERS] = PREFIX


class RegisterPeftModel(peft.PeftModel):
    """A ``peft.PeftModel`` whose saves are atomic and whose model card describes the registers.

    ``save_pretrained`` writes into a temporary folder first and moves the files into place, so an interrupted save
    leaves the previous adapter readable. ``push_to_hub`` uploads the adapter with our model card in one commit.
    Set ``card_metadata["metrics"]`` / ``card_metadata["training"]`` to show results in the card.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.card_metadata: dict[str, dict[str, Any]] = {}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        from .hub import atomic_save

        atomic_save(self, save_directory, super().save_pretrained, **kwargs)

    def create_or_update_model_card(self, output_dir: str) -> None:
        from .hub import render_model_card

        card = render_model_card(self, self.active_adapter, **self.card_metadata)
        card.save(os.path.join(output_dir, "README.md"))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the active adapter and its model card in one commit; see :func:`register_adapter.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **{**self.card_metadata, **kwargs})


def add_registers(
    model: nn.Module, num_register_tokens: int = 4, *, adapter_name: str = "default", **config_kwargs: Any
) -> peft.PeftModel:
    """Give a vision transformer ``num_register_tokens`` trainable register tokens, as a ``peft.PeftModel``.

    Equivalent to ``peft.get_peft_model(model, RegisterConfig(num_register_tokens=..., **config_kwargs))``, returning
    a :class:`RegisterPeftModel` (a ``PeftModel`` with atomic saves and a register model card).

    Args:
        model: A transformers ViT, DeiT, CLIP, DINOv2, DINOv3, SigLIP, I-JEPA, ViTMAE or AIMv2 model.
        num_register_tokens: Number of register tokens (the paper uses 4).
        adapter_name: Name of the adapter.
        **config_kwargs: Further :class:`RegisterConfig` fields (``init``, ``strip_registers``, ``modules_to_save``).

    Example:

    >>> from register_adapter import add_registers
    >>> from register_adapter.tiny import build_tiny_model
    >>> model = add_registers(build_tiny_model("tiny-dinov2"), num_register_tokens=4)
    >>> model.get_nb_trainable_parameters()  # 4 registers x hidden size 32 train, the base model stays frozen
    (128, 33440)
    """
    config = RegisterConfig(num_register_tokens=num_register_tokens, **config_kwargs)
    if config.base_model_name_or_path is None:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        config.base_model_name_or_path = name or None
    return RegisterPeftModel(model, config, adapter_name=adapter_name)

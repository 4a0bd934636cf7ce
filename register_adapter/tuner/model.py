"""The tuner: finds the vision tower and wraps its embeddings (with LoRA, its attention projections; with test-time
registers, the MLP output projections that register neurons feed)."""

from __future__ import annotations

import copy
import operator
import re
from typing import Any

import peft
import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.backbone_utils import BackboneMixin

from ..architectures import find_vision_tower
from ..errors import AdapterMismatchError, MergeNotSupportedError
from ..peft_integration import PREFIX, check_adapter_state
from .config import RegisterConfig
from .layer import MERGE_MESSAGE, RegisterLayer
from .lora import add_lora, check_lora_targets, lora_pattern
from .neurons import add_neuron_layer, check_lora_overlap, neuron_targets
from .placement import check_movable, keep_saved_modules, move_tower_keys, size_heads
from .unlocked import UnlockedLayer, check_unlockable, embedding_weight_names, last_block_key


class RegisterModel(BaseTuner):
    """Adds register tokens to a vision transformer (https://arxiv.org/abs/2309.16588).

    Created by ``peft.get_peft_model(model, RegisterConfig(...))`` or :func:`add_registers`; not used directly.
    """

    prefix: str = PREFIX
    # Register layers and, with ``lora_r > 0``, PEFT's LoRA layers: both are switched, disabled and deleted together.
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # Each adapter gets its own copy of the config: the fields filled in below describe this model, and a config
        # object the user passes again (to another model) must not carry them over.
        self.peft_config[adapter_name] = copy.copy(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _prepare_adapter_config(self, peft_config: RegisterConfig, model_config: dict) -> RegisterConfig:
        tower = find_vision_tower(self.model)
        found = {
            "family": tower.spec.name,
            "hidden_size": tower.hidden_size,
            "native_register_tokens": tower.num_native_registers,
        }
        for field, value in found.items():
            expected = getattr(peft_config, field)
            if expected is not None and expected != value:
                raise AdapterMismatchError(
                    f"This adapter was made for {field}={expected!r}, but the model has {field}={value!r} "
                    f"({type(self.model).__name__}). Load it into a model of the same family and size."
                )
            setattr(peft_config, field, value)
        if peft_config.tower_path is None:
            peft_config.tower_path = tower.path
        elif peft_config.tower_path != tower.path:
            # A loaded adapter keeps the path its weights were saved under until they are loaded (and moved to this
            # model's tower) by _remap_adapter_state_dict_for_load.
            check_movable(self.model, tower, peft_config)
        keep_saved_modules(self.model, peft_config)
        targets = [re.escape(tower.key(tower.spec.embeddings))]
        unlocked = peft_config.unlocked_weights or []
        check_unlockable(tower, unlocked)
        if "last_block" in unlocked:
            targets.append(re.escape(last_block_key(tower)))
        neurons = neuron_targets(tower, peft_config)  # AdapterMismatchError for neurons the model lacks
        if peft_config.lora_r:
            check_lora_targets(tower, peft_config.lora_target_modules)
            lora = lora_pattern(tower.key(tower.spec.layers), peft_config.lora_target_modules)
            check_lora_overlap(neurons, lora)
            targets.append(lora)
        targets += map(re.escape, neurons)
        peft_config.target_modules = "|".join(targets)
        return peft_config

    def _prepare_model(self, peft_config: RegisterConfig, model: nn.Module) -> None:
        if peft_config.labels is not None:
            size_heads(model, peft_config.modules_to_save or [], peft_config.labels)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: RegisterConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Move the saved weights from the tower path they were saved under to this model's tower, then check that
        they restore the adapter exactly (see :func:`~register_adapter.peft_integration.check_adapter_state`)."""
        tower = find_vision_tower(model)
        if config.tower_path is not None and config.tower_path != tower.path:
            state_dict = move_tower_keys(state_dict, config.tower_path, tower.path)
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        state_dict = check_adapter_state(model, config, adapter_name, state_dict)
        config.tower_path = tower.path
        return state_dict

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
        neurons = neuron_targets(tower, peft_config)
        if current_key in neurons:
            new_layer = add_neuron_layer(target, adapter_name, neurons[current_key], peft_config, tower)
            if new_layer is not None:
                self._replace_module(parent, target_name, new_layer, target)
            return
        if current_key == last_block_key(tower):
            block = target.get_base_layer() if isinstance(target, UnlockedLayer) else target
            self._unlock(target, adapter_name, [name for name, _ in block.named_parameters()], parent, target_name)
            return
        if current_key != tower.key(tower.spec.embeddings):
            new_lora = add_lora(target, adapter_name, peft_config, current_key)
            if new_lora is not None:
                if adapter_name not in self.active_adapters:
                    new_lora.requires_grad_(False)
                self._replace_module(parent, target_name, new_lora, target)
            return
        unlocked = embedding_weight_names(tower, peft_config.unlocked_weights or [])
        if isinstance(target, RegisterLayer):
            if unlocked:  # the copies sit between the register layer and the embeddings
                self._unlock(target.base_layer, adapter_name, unlocked, target, "base_layer")
            target.update_layer(adapter_name, peft_config)
            return
        if unlocked:
            target = self._unlock(target, adapter_name, unlocked)
        is_backbone = isinstance(self.model, BackboneMixin)
        new_module = RegisterLayer(target, adapter_name, peft_config, tower, is_backbone=is_backbone)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _unlock(
        self,
        target: nn.Module,
        adapter_name: str,
        names: list[str],
        parent: nn.Module | None = None,
        target_name: str = "",
    ) -> UnlockedLayer:
        """Give ``adapter_name`` trainable copies of the parameters ``names`` of ``target`` (see
        :class:`UnlockedLayer`), put in place of ``target`` in ``parent`` when given."""
        if isinstance(target, UnlockedLayer):
            target.update_layer(adapter_name, names)
            return target
        layer = UnlockedLayer(target, adapter_name, names)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)
        if parent is not None:
            setattr(parent, target_name, layer)
        return layer

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Unlocked copies keep their dotted names inside the wrapped module
        # (``unlocked_weights.<adapter>.patch_embeddings.projection.weight``); PEFT drops an adapter name only from the
        # last two places of a key. Loading inverts this same mapping, so saving and loading stay symmetric.
        marker = f".{UnlockedLayer.adapter_layer_names[0]}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{UnlockedLayer.adapter_layer_names[0]}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if enabled:
            self._freeze_inference_adapters()

    def _freeze_inference_adapters(self) -> None:
        """Keep the weights of adapters in inference mode frozen: PEFT's ``enable_adapters`` (run on leaving
        ``disable_adapter()``) makes every active adapter trainable again, including a training-free one (test-time
        registers) or one loaded without ``is_trainable``."""
        frozen = [name for name in self.active_adapters if self.peft_config[name].inference_mode]
        if not frozen:
            return
        for module in self.model.modules():
            if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                continue
            for layer_name in module.adapter_layer_names:
                weights = operator.attrgetter(layer_name)(module)  # a ParameterDict or ModuleDict by adapter
                for name in frozen:
                    if name in weights:
                        weights[name].requires_grad_(False)

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
        replaced: list[str] = []  # a register layer may wrap an unlocked layer: the outer one unloads both
        for key, module in list(self.model.named_modules()):
            if not isinstance(module, (RegisterLayer, UnlockedLayer)) or any(
                key.startswith(f"{r}.") for r in replaced
            ):
                continue
            if isinstance(module, RegisterLayer):
                module.remove_hooks()
            parent, _, target_name = _get_submodules(self.model, key)
            setattr(parent, target_name, module.get_base_layer())
            replaced.append(key)
        # LoRA layers go back to their base layers, a ModulesToSaveWrapper to its trained copy.
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def add_registers(
    model: nn.Module, num_register_tokens: int = 4, *, adapter_name: str = "default", **config_kwargs: Any
) -> peft.PeftModel:
    """Give a vision transformer ``num_register_tokens`` trainable register tokens, as a ``peft.PeftModel``.

    This is ``peft.get_peft_model(model, RegisterConfig(num_register_tokens=..., **config_kwargs))``. Like every
    ``PeftModel`` holding a register adapter, it saves atomically and writes a register model card; set
    ``model.card_metadata = {"metrics": {...}, "training": {...}}`` to show results in that card.

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
    return peft.get_peft_model(model, config, adapter_name=adapter_name)

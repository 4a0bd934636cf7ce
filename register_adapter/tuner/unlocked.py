"""Base-model weights that a register adapter trains: per-adapter copies, applied with ``torch.func.functional_call``.

PH-Reg (Chen et al., https://arxiv.org/abs/2505.21501) trains, besides the registers, the position embeddings, the
patch embedding and the last block of the model it distills into. Those weights stay untouched in the base model: the
adapter holds a trained copy of each (:class:`UnlockedLayer`), so ``disable_adapter()`` gives the base model back
exactly, ``unload()`` restores it, ``save_pretrained`` writes only the copies, and several adapters can each hold
their own. Position embeddings are often a bare ``nn.Parameter`` read inside the embeddings' forward, which no module
wrapper could replace; ``functional_call`` runs the wrapped module with the copies in place of its own parameters.

>>> import torch
>>> layer = UnlockedLayer(torch.nn.Linear(2, 2), "default", ["weight"])
>>> sorted(name for name, _ in layer.named_parameters())
['base_layer.bias', 'base_layer.weight', 'unlocked_weights.default.weight']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..architectures import VisionTower
from ..errors import InvalidConfigError, MergeNotSupportedError, UnsupportedModelError
from .layer import MERGE_MESSAGE, BaseLayerAttributes


def _copies(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """A module tree holding trainable copies of the parameters ``names`` of ``module``, at the same dotted names."""
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        owner.register_parameter(leaf, nn.Parameter(module.get_parameter(name).detach().clone()))
    return root


class UnlockedLayer(BaseLayerAttributes, nn.Module, BaseTunerLayer):
    """Wraps a module and runs it, for each adapter that unlocked it, with that adapter's copies of some of its
    parameters.

    Args:
        base_layer: The module whose parameters are unlocked (a block, or the embeddings).
        adapter_name: The adapter the copies belong to.
        names: Dotted names, inside ``base_layer``, of the parameters to copy.
    """

    adapter_layer_names = ("unlocked_weights",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, names: Sequence[str]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.unlocked_weights = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, names)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, names: Sequence[str], **kwargs: Any) -> None:
        self.unlocked_weights[adapter_name] = _copies(self.base_layer, names)
        self.set_adapter(self.active_adapters)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [] if self.disable_adapters else [n for n in self.active_adapters if n in self.unlocked_weights]
        if not names:
            return self.base_layer(*args, **kwargs)
        if len(names) > 1:
            raise InvalidConfigError(
                f"The active adapters {names} each hold their own copy of the weights of "
                f"{type(self.get_base_layer()).__name__}; activate one of them."
            )
        # A bf16 base model keeps adapter weights in float32 (PEFT's autocast_adapter_dtype): run in its dtype.
        weights = {
            name: weight.to(self.base_layer.get_parameter(name).dtype)
            for name, weight in self.unlocked_weights[names[0]].named_parameters()
        }
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise MergeNotSupportedError(MERGE_MESSAGE)

    def unmerge(self) -> None:
        return None


def check_unlockable(tower: VisionTower, unlocked: Sequence[str]) -> None:
    """Refuse to unlock position embeddings in a family that has none (DINOv3 rotates queries and keys instead).

    Raises:
        UnsupportedModelError: the message names the family and how to leave the option out.
    """
    if "position_embeddings" in unlocked and tower.position_embeddings is None:
        raise UnsupportedModelError(
            f"unlocked_weights includes 'position_embeddings', but {type(tower.module).__name__} "
            f"({tower.spec.name}) has no learned position table: it encodes positions by rotating queries and keys "
            "(RoPE). Leave position_embeddings out (--unlock_position_embeddings False)."
        )


def embedding_weight_names(tower: VisionTower, unlocked: Sequence[str]) -> list[str]:
    """Dotted names, inside the embeddings, of the unlocked parameters that live there: the position table and the
    patch embedding's weight and bias."""
    embeddings = tower.embeddings
    if isinstance(embeddings, BaseTunerLayer):
        embeddings = embeddings.get_base_layer()
    names = []
    if "position_embeddings" in unlocked:
        table = tower.position_embeddings
        names += [name for name, parameter in embeddings.named_parameters() if parameter is table]
    if "patch_embedding" in unlocked:
        prefix = tower.spec.patch_embedding
        names += [f"{prefix}.{name}" for name, _ in embeddings.get_submodule(prefix).named_parameters()]
    return names


def last_block_key(tower: VisionTower) -> str:
    """The dotted name, in the model, of the tower's last block."""
    return tower.key(f"{tower.spec.layers}.{len(tower.blocks) - 1}")

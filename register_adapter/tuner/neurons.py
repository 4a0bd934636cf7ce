"""Test-time registers inside a register adapter: the MLP edit of Jiang et al., "Vision Transformers Don't Need
Trained Registers" (https://arxiv.org/abs/2506.08010, Algorithm 2).

A few MLP hidden units, the *register neurons*, write the high-norm artifact tokens into the residual stream. In each
block that holds some, :class:`RegisterNeuronLayer` wraps the MLP output projection (its input is the hidden
activation: post-GELU, or the gated product of a SwiGLU MLP) and moves their activation onto the adapter's registers
before the projection: per image, a register neuron's activation on its register becomes the neuron's maximum over
the image's tokens, and 0 on every other token. Registers the model has itself (``Dinov2WithRegisters``, DINOv3) are
left as they are: they neither give nor lose activation. The edit is adapter state rebuilt from the config alone (the
neurons are config fields), so ``PeftModel.from_pretrained`` restores it, ``disable_adapter()`` skips it and
``unload()`` puts the projections back.

>>> import torch
>>> from register_adapter.tuner.neurons import move_to_registers
>>> hidden = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [5.0, 7.0], [1.0, 3.0]]])  # (B=1, S=4, I=2): CLS, register, 2 patches
>>> move_to_registers(hidden, torch.tensor([1]), torch.tensor([1]), mode="neuron_max", num_kept=0)
tensor([[[0., 0.],
         [0., 7.],
         [5., 0.],
         [1., 0.]]])
"""

from __future__ import annotations

import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..architectures import VisionTower
from ..errors import AdapterMismatchError, InvalidConfigError, MergeNotSupportedError, UnsupportedModelError
from .config import RegisterConfig
from .layer import MERGE_MESSAGE, BaseLayerAttributes, RegisterLayer

#: Register neurons listed in an error message, at most.
_SHOWN = 6


def move_to_registers(
    hidden: torch.Tensor,
    units: torch.Tensor,
    positions: torch.Tensor,
    *,
    mode: str,
    num_kept: int,
    native: slice = slice(0, 0),
) -> torch.Tensor:
    """Move the activation of register neurons onto registers, for every image of the batch on its own.

    Args:
        hidden: (B, S, I) the MLP hidden activation of one block.
        units: (K,) the register neurons of this block.
        positions: (K,) sequence index of the register each neuron moves to.
        mode: ``"neuron_max"``: a neuron's register gets the neuron's maximum over the tokens. ``"layer_max"``: it
            gets the one value of largest magnitude, with its sign, over all ``units`` and tokens (the public code's
            ``sign_max``).
        num_kept: Leading tokens (CLS, DeiT's distillation token) that keep their activation; every other token but
            the registers and ``native`` gets 0.
        native: The model's own registers: left out of the edit (their activation stays, and is not moved).

    Returns:
        (B, S, I) a new tensor; ``hidden`` is left as it was.

    >>> hidden = torch.tensor([[[1.0], [9.0], [0.0], [4.0], [2.0]]])  # (B=1, S=5, I=1): CLS, native, ours, 2 patches
    >>> unit, register = torch.tensor([0]), torch.tensor([2])
    >>> move_to_registers(hidden, unit, register, mode="neuron_max", num_kept=0, native=slice(1, 2))
    tensor([[[0.],
             [9.],
             [4.],
             [0.],
             [0.]]])
    """
    selected = hidden.index_select(-1, units)  # (B, S, K)
    candidates = selected  # the tokens whose activation is moved: all but the model's own registers
    if native.stop > native.start:
        candidates = selected.index_fill(
            1,
            torch.arange(native.start, native.stop, device=hidden.device),
            -torch.inf if mode == "neuron_max" else 0.0,
        )
    if mode == "neuron_max":
        peak = candidates.amax(dim=1)  # (B, K)
    else:
        flat = candidates.flatten(1)  # (B, S * K)
        peak = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True)).expand(-1, len(units))  # (B, K)
    moved = torch.zeros_like(selected)  # (B, S, K)
    moved[:, :num_kept] = selected[:, :num_kept]
    moved[:, native] = selected[:, native]
    moved[:, positions, torch.arange(len(units), device=hidden.device)] = peak
    # A copy (not an in-place edit), so that hooks holding the input still see the activation as the MLP made it.
    return hidden.clone().index_copy_(-1, units, moved)  # (B, S, I)


class RegisterNeuronLayer(BaseLayerAttributes, nn.Module, BaseTunerLayer):
    """Wraps the MLP output projection of one block and moves its register neurons' activation onto the registers
    the active adapters insert (see :func:`move_to_registers`).

    Holds no weights: the neurons, the mode and the CLS option of each adapter come from its
    :class:`~register_adapter.RegisterConfig`. The registers are found through the tower's embeddings (a
    :class:`~register_adapter.RegisterLayer`), which knows where each adapter's registers sit in the sequence.
    """

    adapter_layer_names = ()
    other_param_names = ("register_units", "neuron_mode", "keep_cls")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        units: list[tuple[int, int]],
        config: RegisterConfig,
        tower: VisionTower,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_units: dict[str, list[tuple[int, int]]] = {}
        self.neuron_mode: dict[str, str] = {}
        self.keep_cls: dict[str, bool] = {}
        self.num_class_tokens = tower.num_prefix_tokens - tower.num_native_registers
        self.native = slice(self.num_class_tokens, tower.num_prefix_tokens)  # the model's own registers
        # A tuple, so that the tower is not registered as a submodule of its own block.
        self._tower = (tower.module,)
        self._embeddings_name = tower.spec.embeddings
        self._indices: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, units, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, units: list[tuple[int, int]], config: RegisterConfig) -> None:
        """Set ``adapter_name``'s register neurons of this block, as ``(unit, register index)`` pairs."""
        self.register_units[adapter_name] = list(units)
        self.neuron_mode[adapter_name] = config.neuron_mode
        self.keep_cls[adapter_name] = config.keep_cls
        self._indices = {key: value for key, value in self._indices.items() if key[0] != adapter_name}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._indices = {key: value for key, value in self._indices.items() if key[0] != adapter_name}

    def _index(self, adapter_name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) units and (K,) register offsets of ``adapter_name``, on ``device`` (made once per device)."""
        key = (adapter_name, device)
        if key not in self._indices:
            units, owners = zip(*self.register_units[adapter_name])
            self._indices[key] = (torch.tensor(units, device=device), torch.tensor(owners, device=device))
        return self._indices[key]

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        embeddings = getattr(self._tower[0], self._embeddings_name)
        if not self.disable_adapters and isinstance(embeddings, RegisterLayer):
            for name in self.active_adapters:
                start = embeddings.register_start(name) if name in self.register_units else None
                if start is None:
                    continue
                units, owners = self._index(name, hidden.device)
                kept = self.num_class_tokens if self.keep_cls[name] else 0
                hidden = move_to_registers(
                    hidden, units, start + owners, mode=self.neuron_mode[name], num_kept=kept, native=self.native
                )
        return self.base_layer(hidden, *args, **kwargs)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise MergeNotSupportedError(MERGE_MESSAGE)

    def unmerge(self) -> None:
        return None


def mlp_width(tower: VisionTower, block: nn.Module) -> int:
    """Hidden units of ``block``'s MLP: the input width of its output projection.

    Raises:
        UnsupportedModelError: the family has no MLP output projection, or it is not an ``nn.Linear``.
    """
    try:
        projection = tower.mlp_out_proj(block)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(
            f"{error} Test-time registers edit the input of the MLP output projection: declare where it is in the "
            "family's FamilySpec.mlp_out_proj (register_adapter.register_family)."
        ) from error
    if isinstance(projection, BaseTunerLayer):
        projection = projection.get_base_layer()
    if not isinstance(projection, nn.Linear):
        raise UnsupportedModelError(
            f"The MLP output projection of {type(block).__name__} ({tower.mlp_out_proj_path(block)}) is a "
            f"{type(projection).__name__}; test-time registers edit the input of an nn.Linear projection."
        )
    return projection.in_features


def check_neurons_fit(tower: VisionTower, neurons: list[tuple[int, int]]) -> None:
    """Check that every ``(block, unit)`` names a block of the tower and a hidden unit of that block's MLP.

    Raises:
        AdapterMismatchError: some do not; the message lists them with the model's depth and MLP width.
        UnsupportedModelError: the MLP output projection is not an ``nn.Linear``.
    """
    blocks = tower.blocks
    widths = [mlp_width(tower, block) for block in blocks]
    wrong = [(b, u) for b, u in neurons if b >= len(blocks) or u >= widths[b]]
    if not wrong:
        return
    shown = ", ".join(map(str, wrong[:_SHOWN])) + (", ..." if len(wrong) > _SHOWN else "")
    sizes = sorted(set(widths))
    width = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    raise AdapterMismatchError(
        f"{len(wrong)} of the {len(neurons)} register neurons do not fit {type(tower.module).__name__} ({len(blocks)} "
        f"blocks, numbered from 0, of {width} MLP hidden units): {shown}. They were found for another model: run "
        "register_adapter.find_register_neurons on this one."
    )


def neuron_targets(tower: VisionTower, config: RegisterConfig) -> dict[str, list[tuple[int, int]]]:
    """The module key of each hooked MLP output projection -> its ``(unit, register index)`` pairs. Neuron ``i`` of
    ``config.register_neurons`` goes to register ``i % num_register_tokens``, so that every register gets a share
    of the strongest neurons."""
    if not config.register_neurons:
        return {}
    check_neurons_fit(tower, config.register_neurons)
    by_block: dict[int, list[tuple[int, int]]] = {}
    for index, (block, unit) in enumerate(config.register_neurons):
        by_block.setdefault(block, []).append((unit, index % config.num_register_tokens))
    blocks = tower.blocks
    return {
        tower.key(f"{tower.spec.layers}.{block}.{tower.mlp_out_proj_path(blocks[block])}"): units
        for block, units in sorted(by_block.items())
    }


def check_lora_overlap(targets: dict[str, list[tuple[int, int]]], lora_pattern: str) -> None:
    """Refuse LoRA on a projection that register neurons feed.

    Raises:
        InvalidConfigError: a LoRA target is the MLP output projection of a block with register neurons.
    """
    shared = [key for key in targets if re.fullmatch(lora_pattern, key)]
    if shared:
        raise InvalidConfigError(
            f"lora_target_modules includes {shared[0]}, the MLP output projection the register neurons feed; "
            "choose other LoRA targets (e.g. the attention projections)."
        )


def add_neuron_layer(
    target: nn.Module, adapter_name: str, units: list[tuple[int, int]], config: RegisterConfig, tower: VisionTower
) -> nn.Module | None:
    """Wrap ``target`` (an MLP output projection) for ``adapter_name``, or add the adapter to the layer already
    wrapping it.

    Returns:
        The new module to put in place of ``target``, or ``None`` when ``target`` already was a neuron layer.
    """
    if isinstance(target, RegisterNeuronLayer):
        target.update_layer(adapter_name, units, config)
        return None
    return RegisterNeuronLayer(target, adapter_name, units, config, tower)

"""The tuner layer: wraps a vision tower's embeddings, inserts register tokens, and removes them again."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.backbone_utils import BackboneMixin

from ..architectures import VisionTower
from ..errors import InvalidConfigError, MergeNotSupportedError
from .config import RegisterConfig


def _floating_param(module: nn.Module) -> torch.Tensor | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def insert_tokens(sequence: torch.Tensor, tokens: torch.Tensor, position: int) -> torch.Tensor:
    """Insert ``tokens`` (1 or B, R, D) into ``sequence`` (B, S, D) before index ``position``."""
    tokens = tokens.to(dtype=sequence.dtype).expand(sequence.shape[0], -1, -1)  # (B, R, D)
    return torch.cat([sequence[:, :position], tokens, sequence[:, position:]], dim=1)  # (B, S + R, D)


def remove_tokens(sequence: torch.Tensor, position: int, count: int) -> torch.Tensor:
    """Remove ``count`` tokens of ``sequence`` (B, S, ...) starting at ``position``: the inverse of insert_tokens."""
    return torch.cat([sequence[:, :position], sequence[:, position + count :]], dim=1)  # (B, S - count, ...)


def _strip_output(output: Any, position: int, count: int) -> Any:
    """Remove the registers from ``last_hidden_state`` of a module output (a tensor, a tuple or a model output)."""
    if isinstance(output, torch.Tensor):
        return remove_tokens(output, position, count)
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return (remove_tokens(output[0], position, count), *output[1:])
    output.last_hidden_state = remove_tokens(output.last_hidden_state, position, count)
    return output


class BaseLayerAttributes:
    """Attributes a tuner layer lacks are read from its ``base_layer``: model code reads through the modules it wraps
    (``self.embeddings.patch_embeddings.projection.weight.dtype``, ``mlp.fc2.in_features``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class RegisterLayer(BaseLayerAttributes, nn.Module, BaseTunerLayer):
    """Wraps the ``embeddings`` module of a vision tower and inserts the active adapter's register tokens.

    The layout of the sequence becomes ``[prefix (CLS, distillation, native registers), REG_1..REG_R, PATCH...]``.
    Registers are inserted on the output of the embeddings, after position embeddings were added, so they get no
    position embedding and position interpolation keeps working unchanged.

    The layer also installs forward hooks on the vision tower (never on the wrapped module): one pads a user attention
    mask for the registers, one removes the registers again. They are removed by :meth:`remove_hooks`. Where
    registers are removed:

    * ``hidden_states`` and ``attentions`` always hold every token, registers included: they are the residual
      stream, as in transformers' native ``Dinov2WithRegisters`` models (split them with
      :func:`register_adapter.split_tokens`).
    * With ``strip_registers=True`` (the default) ``last_hidden_state`` and everything computed from it (poolers,
      heads) see the sequence without registers, so outputs keep the base model's shapes.
    * With ``strip_registers=False`` ``last_hidden_state`` keeps them, and so do the heads computed from it.
    * Outputs laid out on the patch grid never hold registers, whatever ``strip_registers`` says: ``*Backbone``
      feature maps (when ``reshape_hidden_states``; sequence-shaped feature maps follow ``strip_registers``), the
      masked-image-modeling and MAE decoders (``FamilySpec.spatial_heads``). A ``*Backbone`` thus behaves as the
      native ``Dinov2WithRegistersBackbone``: registers are removed only from the copy of the hidden states that the
      feature maps are built from. DINOv3's backbone ``last_hidden_state`` follows ``strip_registers``.
    """

    adapter_layer_names = ("register_tokens",)
    other_param_names = ("strip_registers",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: RegisterConfig,
        tower: VisionTower,
        is_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_tokens = nn.ParameterDict()
        self.strip_registers: dict[str, bool] = {}
        self.num_prefix_tokens = tower.num_prefix_tokens
        self.hidden_size = tower.hidden_size
        self.num_inserted = 0
        self._disable_adapters = False
        self.merged_adapters = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._install_hooks(tower, is_backbone)
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: RegisterConfig, **kwargs: Any) -> None:
        reference = _floating_param(self.base_layer)
        shape = (1, config.num_register_tokens, self.hidden_size)
        tokens = torch.empty(shape, device=reference.device, dtype=reference.dtype)
        self.register_tokens[adapter_name] = nn.Parameter(tokens)
        self.strip_registers[adapter_name] = config.strip_registers
        self.reset_parameters(adapter_name, config.init)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init: str = "normal") -> None:
        tokens = self.register_tokens[adapter_name]
        if init == "zeros":
            tokens.zero_()
        elif init == "scaled_randn":
            tokens.normal_(std=1.0 / math.sqrt(self.hidden_size))
        else:
            tokens.normal_(std=1e-6)

    def active_tokens(self) -> tuple[torch.Tensor | None, bool]:
        """The tokens to insert now, (1, R, D), and whether to strip them; ``None`` when no adapter is active."""
        if self.disable_adapters:
            return None, False
        names = [name for name in self.active_adapters if name in self.register_tokens]
        if not names:
            return None, False
        strip = {self.strip_registers[name] for name in names}
        if len(strip) > 1:
            raise InvalidConfigError(
                f"The active adapters {names} disagree on strip_registers; activate adapters that agree."
            )
        if len(names) == 1:
            return self.register_tokens[names[0]], strip.pop()
        tokens = torch.cat([self.register_tokens[name] for name in names], dim=1)  # (1, R, D)
        return tokens, strip.pop()

    @property
    def num_active_registers(self) -> int:
        if self.disable_adapters:
            return 0
        return sum(self.register_tokens[n].shape[1] for n in self.active_adapters if n in self.register_tokens)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        tokens, self._strip = self.active_tokens()
        if tokens is None:
            self.num_inserted = 0
            return output
        self.num_inserted = tokens.shape[1]
        if isinstance(output, tuple):  # ViTMAE: (embeddings, mask, ids_restore)
            return (insert_tokens(output[0], tokens, self.num_prefix_tokens), *output[1:])
        return insert_tokens(output, tokens, self.num_prefix_tokens)

    # hooks on the vision tower -----------------------------------------------------------------------------------

    def _install_hooks(self, tower: VisionTower, is_backbone: bool) -> None:
        spec = tower.spec
        module = tower.module
        self._always_strip = tower.has_spatial_head
        self._full_hidden_states: tuple[torch.Tensor, ...] | None = None
        self._reshape = self._return_tuple = False
        if (is_backbone or isinstance(module, BackboneMixin)) and spec.encoder is not None:
            # Feature maps are built from the encoder's hidden states inside the backbone's forward.
            self._final_norm = spec.strip_at
            self._hooks.append(module.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True))
            self._hooks.append(tower.submodule(spec.encoder).register_forward_hook(self._backbone_encoder_hook))
            self._hooks.append(module.register_forward_hook(self._backbone_output_hook))
        else:
            self._hooks.append(tower.submodule(spec.strip_at).register_forward_hook(self._strip_hook))
        if spec.mask_argument is not None:
            self._mask_argument = spec.mask_argument
            self._mask_position = list(inspect.signature(module.forward).parameters).index(spec.mask_argument)
            self._hooks.append(module.register_forward_pre_hook(self._pad_mask_hook, with_kwargs=True))
        for path in spec.unpad_mask_at:
            if hasattr(module, path.split(".")[0]):
                self._hooks.append(
                    tower.submodule(path).register_forward_pre_hook(self._unpad_mask_hook, with_kwargs=True)
                )

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _strip_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.num_inserted == 0 or not (self._strip or self._always_strip):
            return None
        return _strip_output(output, self.num_prefix_tokens, self.num_inserted)

    def _backbone_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._full_hidden_states, self._return_tuple = None, False
        if self.num_active_registers == 0:
            return None
        # Feature maps are spatial unless the backbone returns them as sequences.
        self._reshape = bool(getattr(module.config, "reshape_hidden_states", True))
        # The output hook edits fields by name, so the backbone returns a model output; it is turned into the tuple
        # the caller asked for afterwards (as transformers' ``can_return_tuple`` would).
        return_dict = kwargs.get("return_dict")
        self._return_tuple = not (getattr(module.config, "return_dict", True) if return_dict is None else return_dict)
        return args, {**kwargs, "return_dict": True}

    def _backbone_encoder_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.num_inserted == 0 or output.hidden_states is None or not (self._strip or self._reshape):
            return None  # no registers, or sequence-shaped feature maps that keep them
        self._full_hidden_states = output.hidden_states
        output.hidden_states = tuple(
            remove_tokens(hidden, self.num_prefix_tokens, self.num_inserted) for hidden in output.hidden_states
        )  # (B, S, D) each: the copy the feature maps are built from
        return output

    def _backbone_output_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        full, self._full_hidden_states = self._full_hidden_states, None
        if full is not None:
            if output.get("hidden_states") is not None:  # only there when the caller asked for them
                output.hidden_states = type(output.hidden_states)(
                    None if mine is None else whole for mine, whole in zip(output.hidden_states, full, strict=True)
                )
            if not self._strip and getattr(output, "last_hidden_state", None) is not None:
                norm = module.get_submodule(self._final_norm)
                output.last_hidden_state = norm(full[-1])  # DINOv3: the normed last stage, every token
        return output.to_tuple() if self._return_tuple else output

    def _pad_mask_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        count = self.num_active_registers
        if count == 0:
            return None
        name, position = self._mask_argument, self._mask_position
        if kwargs.get(name) is not None:
            kwargs[name] = self._pad_mask(kwargs[name], count)
        elif len(args) > position and args[position] is not None:
            args = (*args[:position], self._pad_mask(args[position], count), *args[position + 1 :])
        else:
            return None
        return args, kwargs

    def _pad_mask(self, mask: torch.Tensor, count: int) -> torch.Tensor:
        if mask.dim() != 2:
            raise InvalidConfigError(
                f"{self._mask_argument} must have shape (batch_size, sequence_length) to be padded for "
                f"{count} register tokens, got shape {tuple(mask.shape)}."
            )
        ones = mask.new_ones(mask.shape[0], count, 1)  # (B, R, 1)
        return insert_tokens(mask.unsqueeze(-1), ones, self.num_prefix_tokens).squeeze(-1)  # (B, S + R)

    def _unpad_mask_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.num_inserted == 0 or not self._strip:
            return None
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = remove_tokens(
                kwargs["attention_mask"], self.num_prefix_tokens, self.num_inserted
            )
        elif len(args) > 1 and args[1] is not None:
            args = (args[0], remove_tokens(args[1], self.num_prefix_tokens, self.num_inserted), *args[2:])
        return args, kwargs

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise MergeNotSupportedError(MERGE_MESSAGE)

    def unmerge(self) -> None:
        return None


MERGE_MESSAGE = (
    "Register tokens are extra sequence positions, not a weight delta: they cannot be merged into the base model. "
    "Use model.unload() to get the base model back, or register_adapter.to_dinov2_with_registers(model) to export "
    "a DINOv2 adapter as a native Dinov2WithRegisters model."
)

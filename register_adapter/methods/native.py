"""Conversion between transformers' native ``Dinov2WithRegisters*`` models and DINOv2 + a register adapter.

The native model is the reference implementation of registers in transformers, which makes it the oracle for the
injection: a converted model gives the same outputs (max abs diff 0.0 in fp32 at every resolution, with the default
``antialias=True``).
"""

from __future__ import annotations

import warnings

import torch
import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..architectures import find_vision_tower
from ..errors import UnsupportedModelError
from ..tuner import RegisterLayer, add_registers

# native class -> DINOv2 class with the same heads
_NATIVE_TO_DINOV2 = {
    "Dinov2WithRegistersModel": "Dinov2Model",
    "Dinov2WithRegistersForImageClassification": "Dinov2ForImageClassification",
    "Dinov2WithRegistersBackbone": "Dinov2Backbone",
}
_DINOV2_TO_NATIVE = {v: k for k, v in _NATIVE_TO_DINOV2.items()}
_CONFIG_ONLY_KEYS = ("model_type", "architectures", "transformers_version", "num_register_tokens")


def _rebuild(
    model: torch.nn.Module, class_name: str, config_cls: type, state: dict, **config_updates
) -> torch.nn.Module:
    values = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_ONLY_KEYS}
    config = config_cls(**values, **config_updates)
    new_cls = getattr(transformers, class_name)
    parameter = next(model.parameters())
    with torch.device(parameter.device):  # no CPU copy of a model that lives on the GPU
        new = new_cls(config).to(dtype=parameter.dtype)
    new.set_attn_implementation(model.config._attn_implementation)
    src, dst = model.base_model_prefix, new.base_model_prefix
    state = {(dst + k[len(src) :] if k.startswith(src + ".") else k): v for k, v in state.items()}
    new.load_state_dict(state, strict=True)
    return new.train(model.training)


def from_dinov2_with_registers(
    model: torch.nn.Module, *, antialias: bool = True, adapter_name: str = "default"
) -> PeftModel:
    """Turn a ``Dinov2WithRegisters*`` model into a DINOv2 model with a register adapter holding its registers.

    Args:
        model: A ``Dinov2WithRegistersModel``, ``...ForImageClassification`` or ``...Backbone``.
        antialias: The native model interpolates position embeddings with ``antialias=True``; plain ``Dinov2*``
            classes without. With ``True`` (default) the base is the same DINOv2 architecture with zero native
            registers, so outputs are identical at every resolution. With ``False`` the base is a plain ``Dinov2*``
            class: identical at ``config.image_size`` only; elsewhere the pooler output differs by about 5e-3–2e-2 and
            ``last_hidden_state`` and Backbone feature maps by about 0.15 on random-weight models
            (``benchmarks/antialias_difference.py``).
        adapter_name: Name of the adapter holding the registers.

    The adapter records the base it was made for (``family``, ``native_register_tokens``): with ``antialias=True``
    it loads into a ``Dinov2WithRegisters*`` model built with ``num_register_tokens=0``, with ``antialias=False``
    into a plain ``Dinov2*`` model; any other base is refused with :class:`~register_adapter.AdapterMismatchError`.

    Example:

    >>> from register_adapter import from_dinov2_with_registers
    >>> from register_adapter.tiny import build_tiny_model
    >>> native = build_tiny_model("tiny-dinov2-with-registers")
    >>> model = from_dinov2_with_registers(native)
    >>> type(model.get_base_model()).__name__, model.peft_config["default"].num_register_tokens
    ('Dinov2WithRegistersModel', 2)
    """
    name = type(model).__name__
    if name not in _NATIVE_TO_DINOV2:
        raise UnsupportedModelError(
            f"from_dinov2_with_registers expects one of {', '.join(_NATIVE_TO_DINOV2)}, got {name}."
        )
    tower = find_vision_tower(model)
    registers = tower.embeddings.register_tokens.detach()  # (1, R, D)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("embeddings.register_tokens")}
    if antialias:
        empty = registers[:, :0].clone()  # (1, 0, D)
        state[tower.key("embeddings.register_tokens")] = empty
        base = _rebuild(model, name, transformers.Dinov2WithRegistersConfig, state, num_register_tokens=0)
    else:
        base = _rebuild(model, _NATIVE_TO_DINOV2[name], transformers.Dinov2Config, state)
    peft_model = add_registers(base, registers.shape[1], adapter_name=adapter_name, init="zeros")
    with torch.no_grad():
        find_vision_tower(peft_model).embeddings.register_tokens[adapter_name].copy_(registers)
    return peft_model


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``module`` would have without PEFT's layers, as its active adapters make it compute: the base
    weight of each LoRA layer with the active adapters' LoRA merged in, the active copy of each ``modules_to_save``
    module, and the wrapped embeddings of a :class:`~register_adapter.RegisterLayer` (its tokens left out)."""
    state: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, RegisterLayer):
            return visit(module.base_layer, prefix)
        if isinstance(module, ModulesToSaveWrapper):
            active = [name for name in module.active_adapters if name in module.modules_to_save]
            use = (
                module.modules_to_save[active[0]] if active and not module.disable_adapters else module.original_module
            )
            return visit(use, prefix)
        if isinstance(module, LoraLayer):
            merged = {} if module.disable_adapters else module.active_adapters
            deltas = [module.get_delta_weight(name) for name in merged if name in module.lora_A]
            for key, value in module.get_base_layer().state_dict().items():
                state[prefix + key] = value + sum(deltas) if key == "weight" and deltas else value
            return None
        for key, value in module.state_dict(keep_vars=False).items():
            if "." not in key:  # this module's own parameters and persistent buffers
                state[prefix + key] = value
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")
        return None

    visit(module, "")
    return state


def to_dinov2_with_registers(model: PeftModel) -> torch.nn.Module:
    """Export a DINOv2 model with a register adapter as a native ``Dinov2WithRegisters*`` model.

    The active adapter's registers follow any native ones, as in the adapted model; a head trained with the adapter
    (``modules_to_save``) and LoRA (merged into the attention projections) are exported too. The native model keeps
    its registers in ``last_hidden_state`` (its heads skip them), as transformers' implementation does.

    A ``Dinov2WithRegisters*`` model interpolates position embeddings with antialiasing, plain ``Dinov2*`` models
    without: an adapter made on a plain ``Dinov2*`` model is exported with a warning, as the two agree exactly only on
    images of ``config.image_size`` (see :func:`from_dinov2_with_registers` for the exact base).

    Args:
        model: A ``PeftModel`` over ``Dinov2Model``/``Dinov2ForImageClassification``/``Dinov2Backbone`` or their
            ``Dinov2WithRegisters`` counterparts.
    """
    base = model.get_base_model()
    tower = find_vision_tower(model)
    layer = tower.embeddings
    name = type(base).__name__
    native_name = name if name in _NATIVE_TO_DINOV2 else _DINOV2_TO_NATIVE.get(name)
    if native_name is None or not isinstance(layer, RegisterLayer):
        raise UnsupportedModelError(
            f"to_dinov2_with_registers expects a register adapter on one of "
            f"{', '.join(sorted(_DINOV2_TO_NATIVE))} (or their Dinov2WithRegisters counterparts), got {name}."
        )
    ours, _ = layer.active_tokens()  # (1, R, D)
    if ours is None:
        raise UnsupportedModelError("to_dinov2_with_registers needs an active register adapter; none is active.")
    if native_name != name:
        size = tower.config.image_size
        warnings.warn(
            f"{name} interpolates position embeddings without antialiasing and the exported {native_name} with it, "
            f"as transformers' Dinov2WithRegisters models do: their outputs agree exactly only on {size}x{size} "
            "images (config.image_size) and differ on every other size. Run the exported model at that size, or keep "
            "the adapter for other sizes.",
            stacklevel=2,
        )
    ours = ours.detach()
    native = getattr(layer.base_layer, "register_tokens", ours[:, :0]).detach()  # (1, R0, D)
    state = plain_state_dict(base)
    state[tower.key("embeddings.register_tokens")] = torch.cat([native, ours.to(native.dtype)], dim=1)
    return _rebuild(
        base,
        native_name,
        transformers.Dinov2WithRegistersConfig,
        state,
        num_register_tokens=native.shape[1] + ours.shape[1],
    )

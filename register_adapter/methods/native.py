"""Conversion between transformers' native ``Dinov2WithRegisters*`` models and DINOv2 + a register adapter.

The native model is the reference implementation of registers in transformers, which makes it the oracle for the
injection: a converted model gives the same outputs (max abs diff 0.0 in fp32 at every resolution).
"""

from __future__ import annotations

import torch
import transformers
from peft import PeftModel

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
            class: identical at the native resolution, about 4e-3 apart at others.
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


def to_dinov2_with_registers(model: PeftModel) -> torch.nn.Module:
    """Export a DINOv2 model with a register adapter as a native ``Dinov2WithRegisters*`` model.

    The active adapter's registers follow any native ones, as in the adapted model. The native model keeps its
    registers in ``last_hidden_state`` (its heads skip them), as transformers' implementation does.

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
    ours = ours.detach()
    native = getattr(layer.base_layer, "register_tokens", ours[:, :0]).detach()  # (1, R0, D)
    embeddings_key = tower.key("embeddings")
    state = {}
    for key, value in base.state_dict().items():
        if key.startswith(f"{embeddings_key}.register_tokens."):
            continue
        state[key.replace(f"{embeddings_key}.base_layer.", f"{embeddings_key}.")] = value
    state[f"{embeddings_key}.register_tokens"] = torch.cat([native, ours.to(native.dtype)], dim=1)
    return _rebuild(
        base,
        native_name,
        transformers.Dinov2WithRegistersConfig,
        state,
        num_register_tokens=native.shape[1] + ours.shape[1],
    )

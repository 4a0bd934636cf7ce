"""Training-free test-time registers (Jiang et al., "Vision Transformers Don't Need Trained Registers",
https://arxiv.org/abs/2506.08010), as register adapters that save, push and load like trained ones.

:func:`find_register_neurons` finds the MLP units that write a model's artifact tokens (Algorithm 1);
:func:`add_test_time_registers` adds a register token and moves those units' activation onto it (Algorithm 2).

>>> from register_adapter import add_test_time_registers, find_artifacts, find_register_neurons
>>> from register_adapter.testing import make_artifact_model, make_object_images
>>> planted = make_artifact_model("dinov2")
>>> pixel_values = planted.preprocess(make_object_images(16, planted.image_size).images)
>>> find_artifacts(planted.model, pixel_values).outlier_fraction > 0
True
>>> model = add_test_time_registers(planted.model, find_register_neurons(planted.model, pixel_values, progress=False))
>>> report = find_artifacts(model, pixel_values)
>>> report.outlier_fraction, report.num_registers
(0.0, 1)
"""

from __future__ import annotations

from typing import Any

import peft
from torch import nn

from ...architectures import find_vision_tower
from ...tuner.config import RegisterConfig
from ...tuner.neurons import mlp_width
from .published import PUBLISHED, PublishedNeurons, find_published
from .result import SCORES, RegisterNeurons
from .search import find_register_neurons

__all__ = [
    "PUBLISHED",
    "SCORES",
    "PublishedNeurons",
    "RegisterNeurons",
    "add_test_time_registers",
    "find_register_neurons",
]


def add_test_time_registers(
    model: nn.Module,
    neurons: RegisterNeurons | list[tuple[int, int]] | str | None = None,
    num_register_tokens: int | None = None,
    *,
    mode: str | None = None,
    keep_cls: bool | None = None,
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> peft.PeftModel:
    """Give a vision transformer test-time registers: extra tokens that take over the activation of its register
    neurons, so that its artifacts sit there instead of on background patches. No training.

    The registers are inserted where this library puts registers (after CLS, DeiT's distillation token and native
    registers; :func:`~register_adapter.split_tokens` reports them as registers). In every block with register
    neurons, each image's register gets each register neuron's maximum over the image's tokens, and every other token
    0 (see :class:`~register_adapter.RegisterConfig` for ``mode`` and ``keep_cls``). The result is a register
    adapter like a trained one: ``save_pretrained`` / ``push_to_hub`` write the neurons into its config and card,
    ``PeftModel.from_pretrained`` restores it, ``disable_adapter()`` gives the base model exactly and ``unload()``
    removes every hook. The model keeps its training mode (``eval()`` for inference).

    Args:
        model: A supported model (every built-in family has an MLP output projection).
        neurons: The register neurons: what :func:`find_register_neurons` returned, or ``(block, unit)`` pairs, best
            first (``block`` indexes the vision tower's blocks from 0), or the Hub id of a model with published
            neurons (:data:`~register_adapter.methods.test_time.published.PUBLISHED`: ``"facebook/dinov2-large"``),
            for a copy of it saved elsewhere. ``None`` looks the model up in that table by its Hub id, else by the
            shape of its vision tower (with a warning).
        num_register_tokens: Registers to add; one suffices (the paper). With more, neuron ``i`` goes to register
            ``i % num_register_tokens``.
        mode: ``"neuron_max"`` (the paper) or ``"layer_max"`` (the public code's one signed maximum per block).
        keep_cls: Keep the register neurons' activation on CLS, as the public code does (default: zero it, as the
            paper does).
            These three default to the edit a :class:`RegisterNeurons` was measured with, else to 1,
            ``"neuron_max"`` and ``False``.
        adapter_name: Name of the adapter.
        **config_kwargs: Further :class:`~register_adapter.RegisterConfig` fields (e.g. ``strip_registers``).

    Raises:
        InvalidConfigError: ``neurons=None`` for a model without published neurons (the message says how to find
            them), a name without published neurons, or an invalid setting.
        AdapterMismatchError: a neuron names a block or unit the model does not have, or the named model has
            another shape.
        UnsupportedModelError: the family has no ``nn.Linear`` MLP output projection.
    """
    tower = find_vision_tower(model)
    mlp_width(tower, tower.blocks[0])  # an unsupported MLP fails here, before anything else
    # The edit a RegisterNeurons was measured with, unless told otherwise.
    found = isinstance(neurons, RegisterNeurons)
    edit = (neurons.num_register_tokens, neurons.mode, neurons.keep_cls) if found else (1, "neuron_max", False)
    given = (num_register_tokens, mode, keep_cls)
    num_register_tokens, mode, keep_cls = (value if value is not None else d for value, d in zip(given, edit))
    if neurons is None or isinstance(neurons, str):
        published = find_published(tower, neurons)
        pairs, source = list(published.neurons), published.source
    elif isinstance(neurons, RegisterNeurons):
        pairs, source = list(neurons), neurons.source
    else:
        pairs, source = neurons, None
    settings = {
        "num_register_tokens": num_register_tokens,
        "init": "zeros",
        "method": "test-time",
        "register_neurons": pairs,
        "neuron_mode": mode,
        "keep_cls": keep_cls,
        "neuron_source": source,
        "inference_mode": True,
    }
    config = RegisterConfig(**{**settings, **config_kwargs})
    training = model.training
    # PEFT switches the model to training mode; a training-free adapter keeps the mode it was given.
    return peft.get_peft_model(model, config, adapter_name=adapter_name).train(training)

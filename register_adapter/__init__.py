"""register_adapter: register tokens for any Hugging Face vision transformer, as a PEFT method.

Importing the package makes the ``REGISTERS`` PEFT type known to ``peft`` (``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel``) and to transformers' ``add_adapter`` / ``load_adapter``; see
:mod:`register_adapter.peft_integration` for what that touches. The public names below are imported on first use, so
``import register_adapter`` (and ``register-adapter --help``) loads no model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import peft_integration

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "REGISTERS": "peft_integration",
    "AdapterFilesError": "errors",
    "AdapterMismatchError": "errors",
    "DataError": "errors",
    "DroppedModulesWarning": "errors",
    "IncompatibleVersionsError": "errors",
    "InvalidConfigError": "errors",
    "MergeNotSupportedError": "errors",
    "RegisterAdapterError": "errors",
    "UnsupportedModelError": "errors",
    "FamilySpec": "architectures",
    "VisionTower": "architectures",
    "find_vision_tower": "architectures",
    "register_family": "architectures",
    "supported_model_types": "architectures",
    "TokenGroups": "tokens",
    "TokenLayout": "tokens",
    "split_tokens": "tokens",
    "token_layout": "tokens",
    "RegisterConfig": "tuner",
    "RegisterLayer": "tuner",
    "RegisterModel": "tuner",
    "add_registers": "tuner",
    "DenoisedTeacher": "methods.distillation",
    "PHRegConfig": "methods.distillation",
    "RegisterDistillationTrainer": "methods.distillation",
    "distill_registers": "methods.distillation",
    "from_dinov2_with_registers": "methods",
    "to_dinov2_with_registers": "methods",
    "RegisterNeurons": "methods.test_time",
    "add_test_time_registers": "methods.test_time",
    "find_register_neurons": "methods.test_time",
    "ArtifactReport": "diagnostics",
    "corloc": "metrics",
    "discover_objects": "diagnostics",
    "find_artifacts": "diagnostics",
}

__all__ = [
    "AdapterFilesError",
    "AdapterMismatchError",
    "ArtifactReport",
    "DataError",
    "DenoisedTeacher",
    "DroppedModulesWarning",
    "FamilySpec",
    "IncompatibleVersionsError",
    "InvalidConfigError",
    "MergeNotSupportedError",
    "PHRegConfig",
    "REGISTERS",
    "RegisterAdapterError",
    "RegisterConfig",
    "RegisterDistillationTrainer",
    "RegisterLayer",
    "RegisterModel",
    "RegisterNeurons",
    "TokenGroups",
    "TokenLayout",
    "UnsupportedModelError",
    "VisionTower",
    "__version__",
    "add_registers",
    "add_test_time_registers",
    "corloc",
    "discover_objects",
    "distill_registers",
    "find_artifacts",
    "find_register_neurons",
    "find_vision_tower",
    "from_dinov2_with_registers",
    "register_family",
    "split_tokens",
    "supported_model_types",
    "to_dinov2_with_registers",
    "token_layout",
]

peft_integration.install()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'register_adapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .architectures import FamilySpec, VisionTower, find_vision_tower, register_family, supported_model_types
    from .diagnostics import ArtifactReport, discover_objects, find_artifacts
    from .errors import (
        AdapterFilesError,
        AdapterMismatchError,
        DataError,
        DroppedModulesWarning,
        IncompatibleVersionsError,
        InvalidConfigError,
        MergeNotSupportedError,
        RegisterAdapterError,
        UnsupportedModelError,
    )
    from .methods import from_dinov2_with_registers, to_dinov2_with_registers
    from .methods.distillation import DenoisedTeacher, PHRegConfig, RegisterDistillationTrainer, distill_registers
    from .methods.test_time import RegisterNeurons, add_test_time_registers, find_register_neurons
    from .metrics import corloc
    from .peft_integration import REGISTERS
    from .tokens import TokenGroups, TokenLayout, split_tokens, token_layout
    from .tuner import RegisterConfig, RegisterLayer, RegisterModel, add_registers

"""register_adapter: register tokens for any Hugging Face vision transformer, as a PEFT method.

Importing the package makes the ``REGISTERS`` PEFT type known to ``peft`` (``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel``) and to transformers' ``add_adapter`` / ``load_adapter``.
"""

from .architectures import FamilySpec, VisionTower, find_vision_tower, register_family, supported_model_types
from .config import REGISTERS, RegisterConfig
from .diagnostics import ArtifactReport, find_artifacts
from .discovery import corloc, discover_objects
from .errors import (
    AdapterFilesError,
    AdapterMismatchError,
    DataError,
    InvalidConfigError,
    MergeNotSupportedError,
    RegisterAdapterError,
    UnsupportedModelError,
)
from .layer import RegisterLayer
from .model import RegisterModel, add_registers, register_peft_type
from .native import from_dinov2_with_registers, to_dinov2_with_registers
from .tokens import TokenGroups, TokenLayout, split_tokens, token_layout

__version__ = "0.1.0"

register_peft_type()

__all__ = [
    "REGISTERS",
    "AdapterFilesError",
    "AdapterMismatchError",
    "ArtifactReport",
    "DataError",
    "FamilySpec",
    "InvalidConfigError",
    "MergeNotSupportedError",
    "RegisterAdapterError",
    "RegisterConfig",
    "RegisterLayer",
    "RegisterModel",
    "TokenGroups",
    "TokenLayout",
    "UnsupportedModelError",
    "VisionTower",
    "__version__",
    "add_registers",
    "corloc",
    "discover_objects",
    "find_artifacts",
    "find_vision_tower",
    "from_dinov2_with_registers",
    "register_family",
    "register_peft_type",
    "split_tokens",
    "supported_model_types",
    "to_dinov2_with_registers",
    "token_layout",
]

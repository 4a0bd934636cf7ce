"""The register adapter itself, in PEFT's layout for a method: config, tuner layer, tuner model, LoRA inside it."""

import peft  # noqa: F401  (first: importing peft registers the method, see register_adapter.peft_integration)

from .config import RegisterConfig
from .layer import RegisterLayer
from .model import RegisterModel, add_registers

__all__ = ["RegisterConfig", "RegisterLayer", "RegisterModel", "add_registers"]

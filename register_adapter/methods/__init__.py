"""Ways to obtain registers for a pretrained model beyond training them: conversion from a native registers model,
training-free test-time registers, and post-hoc self-distilled registers (PH-Reg)."""

from .native import from_dinov2_with_registers, to_dinov2_with_registers

__all__ = ["from_dinov2_with_registers", "to_dinov2_with_registers"]

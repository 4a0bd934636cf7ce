"""Named token groups: split any sequence into CLS, registers and patches without index arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architectures import VisionTower, find_vision_tower


@dataclass(frozen=True)
class TokenLayout:
    """How a full sequence is laid out: ``[prefix, native registers, added registers, patches]``.

    Attributes:
        num_prefix_tokens: CLS and distillation tokens (0 for SigLIP, I-JEPA, AIMv2).
        num_native_registers: Registers the architecture has itself (``Dinov2WithRegisters``, DINOv3).
        num_registers: Registers inserted by the active register adapter (0 for a plain or disabled model).
        has_cls: Whether token 0 is a CLS token.
    """

    num_prefix_tokens: int
    num_native_registers: int
    num_registers: int
    has_cls: bool

    @property
    def num_all_registers(self) -> int:
        return self.num_native_registers + self.num_registers

    @property
    def num_special_tokens(self) -> int:
        """Tokens before the first patch."""
        return self.num_prefix_tokens + self.num_all_registers


@dataclass
class TokenGroups:
    """A sequence split by role, as DINOv2's ``x_norm_clstoken`` / ``x_norm_regtokens`` / ``x_norm_patchtokens``.

    Attributes:
        cls: (B, D), or ``None`` for families without a CLS token.
        prefix: (B, P, D), every token before the registers (CLS and DeiT's distillation token).
        registers: (B, R, D), native registers followed by added ones.
        patches: (B, N, D).
    """

    cls: torch.Tensor | None
    prefix: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor


def token_layout(model: nn.Module | VisionTower) -> TokenLayout:
    """The layout of the sequence that ``model`` (or its vision tower) runs on now (the active adapter's registers
    included)."""
    tower = model if isinstance(model, VisionTower) else find_vision_tower(model)
    embeddings = tower.embeddings
    registers = getattr(embeddings, "num_active_registers", 0)  # a RegisterLayer's, 0 for plain embeddings
    native = tower.num_native_registers
    return TokenLayout(
        num_prefix_tokens=tower.num_prefix_tokens - native,
        num_native_registers=native,
        num_registers=registers,
        has_cls=tower.spec.has_cls,
    )


def split_tokens(sequence: torch.Tensor, layout: TokenLayout | nn.Module) -> TokenGroups:
    """Split a full sequence (B, S, D), e.g. ``hidden_states[i]``, into named groups.

    Args:
        sequence: A sequence that still holds every token (registers not stripped).
        layout: A :class:`TokenLayout`, or the model to read it from.

    Example:

    >>> import torch
    >>> from register_adapter import add_registers, split_tokens
    >>> from register_adapter.tiny import build_tiny_model
    >>> model = add_registers(build_tiny_model("tiny-vit"), num_register_tokens=4)
    >>> out = model(pixel_values=torch.rand(1, 3, 30, 30), output_hidden_states=True)
    >>> groups = split_tokens(out.hidden_states[-1], model)
    >>> tuple(groups.registers.shape), tuple(groups.patches.shape)
    ((1, 4, 32), (1, 225, 32))
    """
    if not isinstance(layout, TokenLayout):
        layout = token_layout(layout)
    prefix, registers, patches = sequence.split(
        [layout.num_prefix_tokens, layout.num_all_registers, sequence.shape[1] - layout.num_special_tokens], dim=1
    )
    return TokenGroups(
        cls=prefix[:, 0] if layout.has_cls else None, prefix=prefix, registers=registers, patches=patches
    )

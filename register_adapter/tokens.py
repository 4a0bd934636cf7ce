"""Named token groups: split any sequence into CLS, registers and patches without index arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architectures import VisionTower, find_vision_tower
from .errors import InvalidConfigError


@dataclass(frozen=True)
class TokenLayout:
    """How a full sequence is laid out: ``[prefix, native registers, added registers, patches]``.

    Attributes:
        num_prefix_tokens: CLS and distillation tokens (0 for SigLIP, I-JEPA, AIMv2).
        num_native_registers: Registers the architecture has itself (``Dinov2WithRegisters``, DINOv3).
        num_registers: Registers inserted by the active register adapter (0 for a plain or disabled model).
        has_cls: Whether token 0 is a CLS token.
        sequence_lengths: Lengths of the sequences the model's forward passes produced with ``num_registers``
            registers inserted, when known (a model with a register adapter that has run); :func:`split_tokens`
            refuses sequences of other lengths, which do not hold the registers where this layout puts them.
    """

    num_prefix_tokens: int
    num_native_registers: int
    num_registers: int
    has_cls: bool
    sequence_lengths: frozenset[int] | None = None

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
    included), with the lengths of the sequences its forward passes produced so far with that many registers."""
    tower = model if isinstance(model, VisionTower) else find_vision_tower(model)
    embeddings = tower.embeddings
    registers = getattr(embeddings, "num_active_registers", 0)  # a RegisterLayer's, 0 for plain embeddings
    seen = getattr(embeddings, "layouts_seen", set())
    lengths = frozenset(length for count, length in seen if count == registers)
    native = tower.num_native_registers
    return TokenLayout(
        num_prefix_tokens=tower.num_prefix_tokens - native,
        num_native_registers=native,
        num_registers=registers,
        has_cls=tower.spec.has_cls,
        sequence_lengths=lengths or None,
    )


def split_tokens(sequence: torch.Tensor, layout: TokenLayout | nn.Module) -> TokenGroups:
    """Split a full sequence (B, S, D), e.g. ``hidden_states[i]``, into named groups.

    Args:
        sequence: A sequence that still holds every token (registers not stripped), from a forward pass with the
            registers that ``layout`` describes.
        layout: A :class:`TokenLayout`, or the model to read it from (its adapter as it is now).

    Raises:
        InvalidConfigError: ``sequence`` is shorter than the tokens before the patches, or (for a model with a register
            adapter) of a length its forward passes never produced with these registers: it does not hold them, like
            ``last_hidden_state`` (registers removed) or a sequence of a pass under ``disable_adapter()``.

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
    _check_length(sequence.shape[1], layout)
    prefix, registers, patches = sequence.split(
        [layout.num_prefix_tokens, layout.num_all_registers, sequence.shape[1] - layout.num_special_tokens], dim=1
    )
    return TokenGroups(
        cls=prefix[:, 0] if layout.has_cls else None, prefix=prefix, registers=registers, patches=patches
    )


def _check_length(length: int, layout: TokenLayout) -> None:
    known = layout.sequence_lengths
    if length > layout.num_special_tokens and (known is None or length in known):
        return
    expected = " or ".join(str(n) for n in sorted(known)) if known else f"more than {layout.num_special_tokens}"
    raise InvalidConfigError(
        f"split_tokens got a sequence of {length} tokens, but the model's sequences with {layout.num_registers} "
        f"added registers have {expected} ({layout.num_special_tokens} before the patches): this one does not hold "
        "the registers where the layout puts them. Pass a sequence with every token, such as a hidden state "
        "(output_hidden_states=True) rather than last_hidden_state, from which registers are removed; for a forward "
        "pass under disable_adapter(), take its layout with token_layout(model) inside that block."
    )

"""Forward hooks that read hidden states out of a forward pass: block outputs, attention projections, MLP inputs.

>>> import torch
>>> from register_adapter.hooks import capture
>>> layers = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
>>> with capture(outputs=[layers[0]], inputs=[layers[2]]) as captured:
...     _ = layers(torch.ones(4, 2))
>>> captured[layers[0]].shape, captured[layers[2]].shape
(torch.Size([4, 3]), torch.Size([4, 3]))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass once everything asked for was captured."""


def hidden_states(value: Any) -> torch.Tensor:
    """The hidden states in what a module returns or receives: HF blocks return a tuple or a tensor."""
    return value[0] if isinstance(value, tuple) else value


@contextlib.contextmanager
def capture(
    outputs: Sequence[nn.Module] = (),
    inputs: Sequence[nn.Module] = (),
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop: bool = False,
    detach: bool = True,
) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """Keep the hidden states that ``outputs`` return and that ``inputs`` receive (their first positional argument)
    in forward passes run inside the ``with`` block, by module; each module's last call wins. The hooks are removed
    on exit.

    Args:
        outputs: Modules whose output is kept.
        inputs: Modules whose input is kept (a module belongs in one of the two lists only).
        reduce: Applied to each tensor before it is kept (e.g. token norms, so the full states need not be).
        stop: End the forward pass as soon as every module was captured (the rest of the model does not run; for a
            single forward pass).
        detach: Keep the tensors out of the autograd graph; ``False`` keeps them in it, to train through them.
    """
    captured: dict[nn.Module, torch.Tensor] = {}
    count = len(outputs) + len(inputs)

    def keep(module: nn.Module, value: Any) -> None:
        tensor = hidden_states(value)
        kept = reduce(tensor) if reduce is not None else tensor
        captured[module] = kept.detach() if detach else kept
        if stop and len(captured) == count:
            raise _Stop

    handles = [m.register_forward_hook(lambda module, args, output: keep(module, output)) for m in outputs]
    handles += [m.register_forward_pre_hook(lambda module, args: keep(module, args)) for m in inputs]
    try:
        yield captured
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()

"""``register-adapter train``: train registers, a new classification head and optionally LoRA with the HF ``Trainer``.

Every ``TrainingArguments`` flag works; see :mod:`register_adapter.training.classification`. Also runs as
``torchrun --nproc_per_node N -m register_adapter.cli train ...`` or ``accelerate launch -m register_adapter.cli train``.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, train, return an exit status: 2 for bad input, after one ``error:`` line on stderr."""
    from ..training.classification import PROG, parse_args, train
    from ..training.runtime import run_command

    model_args, data_args, register_args, training_args = parse_args(argv)
    return run_command(
        lambda: train(model_args, data_args, register_args, training_args),
        training_args.get_process_log_level(),
        prog=PROG,
    )

"""``register-adapter distill``: distill registers into a pretrained model from unlabelled images (PH-Reg).

Every ``TrainingArguments`` flag works; see :mod:`register_adapter.training.distillation`. Also runs as
``torchrun --nproc_per_node N -m register_adapter.cli distill ...`` or ``accelerate launch -m register_adapter.cli
distill``.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, distill, return an exit status (2 for bad input)."""
    from ..training.distillation import PROG, distill, parse_args
    from ..training.runtime import run_command

    model_args, data_args, config, training_args = parse_args(argv)
    return run_command(
        lambda: distill(model_args, data_args, config, training_args), training_args.get_process_log_level(), prog=PROG
    )

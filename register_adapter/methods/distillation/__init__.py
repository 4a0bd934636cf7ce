"""Post-hoc self-distilled registers (PH-Reg; Chen et al., https://arxiv.org/abs/2505.21501): the settings, the
denoised teacher, the target cache and the ``Trainer`` that distills registers into a frozen model."""

from .config import PHRegConfig
from .teacher import DenoisedTeacher
from .trainer import DistillationStudent, RegisterDistillationTrainer, distill_registers, distillation_loss

__all__ = [
    "DenoisedTeacher",
    "DistillationStudent",
    "PHRegConfig",
    "RegisterDistillationTrainer",
    "distill_registers",
    "distillation_loss",
]

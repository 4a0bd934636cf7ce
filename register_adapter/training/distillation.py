"""``register-adapter distill``: distill registers into a pretrained model from unlabelled images with PH-Reg.

The command line is ``register-adapter distill`` (or ``torchrun --nproc_per_node N -m register_adapter.cli
distill``, or ``accelerate launch -m register_adapter.cli distill``); every flag of ``transformers.TrainingArguments``
works::

    register-adapter distill --model facebook/dinov2-base --train_dir photos/ --output_dir dinov2-phreg \\
        --num_train_epochs 10 --per_device_train_batch_size 8 --bf16 --cache_targets \\
        --push_to_hub --hub_model_id me/dinov2-base-phreg

What trains: 16 registers and copies of the position embeddings, the patch embedding and the last block (see
:class:`~register_adapter.methods.distillation.PHRegConfig`), all in one adapter that ``PeftModel.from_pretrained``
restores whole. At the end the adapter is saved to ``--output_dir`` with a model card that holds the settings and
the final loss.

From Python:

>>> from register_adapter.training.distillation import distill, parse_args
>>> model = distill(*parse_args(["--model", "tiny-dinov2", "--train_dir", "photos", "--output_dir", "out"]))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field

from peft import PeftModel

from ..errors import DataError, InvalidConfigError
from ..loading import load_model
from ..methods.distillation import PHRegConfig
from ..methods.distillation.trainer import run_distillation
from ..sources import BAD_IMAGE_POLICIES, IMAGE_CHECKS, check_choice, load_named_dataset, load_unlabelled_images
from .arguments import AdapterTrainingArguments, ImageDataArguments, ModelArguments, parse_dataclasses
from .data import take_samples
from .runtime import prepare_push, resolve_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class DistillationTrainingArguments(AdapterTrainingArguments):
    """``TrainingArguments`` with the optimiser settings of PH-Reg's public code: AdamW at 1e-4, weight decay 1e-2,
    decaying exponentially to 5e-6. There is nothing to evaluate: evaluation is off."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate (PH-Reg: 1e-4)."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (PH-Reg: 1e-2)."})
    final_learning_rate: float | None = field(
        default=5e-6,
        metadata={
            "help": "The learning rate decays exponentially from --learning_rate to this value over the run "
            "(PH-Reg: 5e-6). 'None' hands the schedule to --lr_scheduler_type."
        },
    )
    eval_strategy: str | None = field(default="no", metadata={"help": "Distillation has nothing to evaluate."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every this many steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        final = self.final_learning_rate
        if final is not None and not (isinstance(final, numbers.Real) and 0 < final <= self.learning_rate):
            raise InvalidConfigError(
                f"final_learning_rate must satisfy 0 < final_learning_rate <= learning_rate ({self.learning_rate}), "
                f"got {final!r}. PH-Reg decays from 1e-4 to 5e-6; pass --final_learning_rate None to use "
                "--lr_scheduler_type instead."
            )
        if self.final_learning_rate is not None and str(self.lr_scheduler_type.value) != "linear":
            logger.warning(
                "--lr_scheduler_type %s is not used: the learning rate decays exponentially to "
                "--final_learning_rate %s. Pass --final_learning_rate None to use it.",
                self.lr_scheduler_type.value,
                self.final_learning_rate,
            )


PROG = "register-adapter distill"


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, ImageDataArguments, PHRegConfig, DistillationTrainingArguments]:
    """Parse ``register-adapter distill`` arguments (or one ``.json``/``.yaml`` file holding them)."""
    return parse_dataclasses(
        (ModelArguments, ImageDataArguments, PHRegConfig, DistillationTrainingArguments),
        argv,
        prog=PROG,
    )


def distill(
    model_args: ModelArguments,
    data_args: ImageDataArguments,
    config: PHRegConfig,
    training_args: DistillationTrainingArguments,
) -> PeftModel:
    """Load the model and the images, distill, save the adapter with its card (and push it).

    A ``--resume_from_checkpoint`` without a checkpoint and a ``--push_to_hub`` that cannot create its repository are
    refused before anything loads; every other problem with the inputs before the first forward pass (see
    :func:`~register_adapter.methods.distillation.distill_registers`).

    Returns:
        The ``PeftModel`` holding the distilled adapter.
    """
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_choice("on_bad_image", data_args.on_bad_image, BAD_IMAGE_POLICIES)
    check_choice("image_check", data_args.image_check, IMAGE_CHECKS)
    hub_repo_id = prepare_push(training_args)
    if data_args.dataset_name is not None:
        source = load_named_dataset(data_args.dataset_name, data_args.dataset_config_name, model_args.cache_dir)
        images = load_unlabelled_images(source, image_column=data_args.image_column_name, split=data_args.train_split)
    elif data_args.train_dir is not None:
        images = load_unlabelled_images(data_args.train_dir)
    else:
        raise DataError("No training images: pass --train_dir (a folder of images) or --dataset_name.")
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    images = take_samples(images, data_args.max_train_samples, seed)
    model, processor = load_model(model_args.model, "base", **model_args.load_kwargs())
    return run_distillation(
        model,
        images,
        config,
        training_args,
        processor=processor,
        data_args=data_args,
        resume=resume,
        hub_repo_id=hub_repo_id,
        base_model_name=model_args.model,
    )

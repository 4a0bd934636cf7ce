"""PH-Reg on the 🤗 ``Trainer``: distill registers into a frozen model from unlabelled images (arXiv 2505.21501).

The student is the model with a register adapter of method ``distilled``: registers and trained copies of the
unlocked weights (:mod:`register_adapter.tuner.unlocked`). The teacher is the same model with that adapter disabled,
denoised by test-time augmentation (:class:`DenoisedTeacher`). The loss compares the student's final normed patch
tokens with the teacher's: ``cosine_weight * (1 - cos) + mse_weight * MSE``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ...architectures import find_vision_tower
from ...errors import InvalidConfigError
from ...geometry import patch_grid
from ...pixels import default_processor
from ...sources import load_unlabelled_images
from ...training.arguments import ImageDataArguments
from ...training.runtime import (
    check_images_once,
    check_resume_config,
    precision,
    prepare_push,
    publish,
    resolve_checkpoint,
    run_summary,
)
from ...tuner.config import RegisterConfig
from ...tuner.unlocked import check_unlockable
from .cache import cache_key, cached_targets, default_cache_dir, processor_settings
from .config import PHRegConfig
from .data import SAMPLE_ID, TARGETS, DistillationImages, common_output_size, find_small_images, view_rng
from .teacher import DenoisedTeacher, check_distillable, final_patch_tokens, max_offsets

logger = logging.getLogger(__name__)

# Adapter settings that change the trainable parameters: a checkpoint saved with other values cannot be resumed.
RESUME_FIELDS = ("num_register_tokens", "unlocked_weights")


def distillation_loss(
    student: torch.Tensor, targets: torch.Tensor, cosine_weight: float = 1.0, mse_weight: float = 1.0
) -> torch.Tensor:
    """PH-Reg's loss between patch tokens (B, N, D): ``cosine_weight * mean(1 - cos) + mse_weight * MSE``.

    >>> x = torch.randn(2, 5, 8)
    >>> float(distillation_loss(x, x)) < 1e-6
    True
    """
    cosine = torch.nn.functional.cosine_similarity(student, targets, dim=-1, eps=1e-8)  # (B, N)
    return cosine_weight * (1 - cosine).mean() + mse_weight * torch.nn.functional.mse_loss(student, targets)


class DistillationStudent(PeftModel):
    """A ``PeftModel`` whose forward gives the final normed patch tokens of the vision tower, (B, h * w, D).

    The ``Trainer`` (and DDP around it) calls the model it trains; this forward is the student's pass. It runs the
    vision tower alone, so a ``CLIPModel`` needs no text. It is used while distilling only: :func:`distill_registers`
    returns an ordinary ``PeftModel``.
    """

    def __init__(self, model: nn.Module, peft_config: RegisterConfig, adapter_name: str = "default", **kwargs: Any):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.tower = find_vision_tower(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return final_patch_tokens(self.tower, pixel_values)

    def as_peft_model(self) -> PeftModel:
        """The same adapter in an ordinary ``PeftModel`` around the same base model (this one is unloaded)."""
        state = get_peft_model_state_dict(self)
        config = copy.copy(self.peft_config["default"])
        model = PeftModel(self.unload(), config)
        set_peft_model_state_dict(model, state)
        return model


class RegisterDistillationTrainer(Trainer):
    """A ``Trainer`` that distills registers into ``model`` (a :class:`DistillationStudent`) from unlabelled images.

    Every step runs the teacher on the batch (unless the items carry cached ``targets``), then the student, and
    minimises :func:`distillation_loss`. The views of image ``i`` in epoch ``e`` come from
    ``view_rng(seed, i, e)``, so a resumed run and a multi-process run see the views of an uninterrupted single
    process.

    Args:
        model: The student.
        args: Training arguments; with a ``final_learning_rate`` (see
            :class:`~register_adapter.training.distillation.DistillationTrainingArguments`) the learning rate decays
            exponentially, as in the paper: after ``warmup_steps`` steps of linear warmup (step ``s < W`` uses
            ``learning_rate * (s + 1) / (W + 1)``), step ``s`` of ``T`` uses ``learning_rate * (final_learning_rate /
            learning_rate) ** ((s - W) / (T - 1 - W))``: ``learning_rate`` at the first step after the warmup,
            exactly ``final_learning_rate`` at the last (a single step after the warmup uses ``learning_rate``).
        teacher: The teacher, made from ``model``.
        config: The PH-Reg settings (loss weights, cache).
        **kwargs: Further ``Trainer`` arguments (``train_dataset``: a :class:`DistillationImages`).
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps

    def __init__(
        self,
        model: DistillationStudent,
        args: TrainingArguments,
        *,
        teacher: DenoisedTeacher,
        config: PHRegConfig,
        **kwargs,
    ) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher
        self.phreg = config
        self.view_seed = args.data_seed if args.data_seed is not None else args.seed

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pixel_values = inputs["pixel_values"]
        targets = inputs.get(TARGETS)
        if targets is None:
            epoch = math.floor(self.state.epoch or 0)
            rngs = [view_rng(self.view_seed, int(i), epoch) for i in inputs[SAMPLE_ID]]
            targets = self.teacher(pixel_values, rngs=rngs)  # (B, h, w, D)
        student = model(pixel_values=pixel_values)  # (B, h * w, D)
        loss = distillation_loss(
            student.float(), targets.flatten(1, 2).float(), self.phreg.cosine_weight, self.phreg.mse_weight
        )
        return (loss, student) if return_outputs else loss

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        final = getattr(self.args, "final_learning_rate", None)
        if final is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        ratio = final / self.args.learning_rate

        def factor(step: int) -> float:  # of the optimizer step `step` (0-based)
            if step < warmup:  # linear warmup
                return (step + 1) / (warmup + 1)
            # learning_rate at the first step after the warmup, final_learning_rate at the last (num_training_steps - 1)
            return ratio ** min(1.0, (step - warmup) / max(1, num_training_steps - 1 - warmup))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def use_cached_targets(self) -> None:
        """Compute (or read) the teacher's targets of the training images once, and train on them from now on."""
        data: DistillationImages = self.train_dataset
        folder_root = Path(self.phreg.target_cache_dir) if self.phreg.target_cache_dir else default_cache_dir()
        key = cache_key(
            data, self.teacher, seed=self.view_seed, dtype=self.phreg.cache_dtype, precision=precision(self.args)
        )
        targets = cached_targets(
            data,
            self.teacher,
            folder_root / key,
            seed=self.view_seed,
            dtype=self.phreg.cache_dtype,
            batch_size=self.args.per_device_train_batch_size,
            process_index=self.args.process_index,
            num_processes=self.args.world_size,
            num_workers=self.args.dataloader_num_workers,
            autocast=self.accelerator.autocast,
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )
        self.train_dataset = data.with_targets(targets)


def distill_registers(
    model: nn.Module,
    dataset: Any,
    config: PHRegConfig | None = None,
    training_args: TrainingArguments | None = None,
    *,
    processor: Any = None,
    data_args: ImageDataArguments | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> PeftModel:
    """Distill registers into ``model`` with PH-Reg (Chen et al., "Vision Transformers with Self-Distilled
    Registers", https://arxiv.org/abs/2505.21501), on the 🤗 ``Trainer``.

    The result is a ``PeftModel`` holding one register adapter of method ``distilled``: the registers and the
    trained copies of the unlocked weights. ``save_pretrained`` / ``push_to_hub`` write them with a model card (the
    unlocked weights, the settings, the final loss) and ``PeftModel.from_pretrained`` restores the distilled model
    exactly; ``disable_adapter()`` is the teacher; ``unload()`` gives the base model back.

    Args:
        model: A pretrained model of a supported family (ViT, DeiT, CLIP or ``CLIPModel``, DINOv2 with or without
            registers, DINOv3, SigLIP, I-JEPA, AIMv2); not a ``PeftModel``.
        dataset: Unlabelled images: a ``datasets`` dataset with an image column, a folder, or a list of files.
        config: The PH-Reg settings (default :class:`PHRegConfig`).
        training_args: ``TrainingArguments``; :class:`~register_adapter.training.distillation.DistillationTrainingArguments`
            holds the paper's optimiser settings. Every flag works: checkpoints, ``resume_from_checkpoint``,
            ``push_to_hub``, ``bf16``, DDP.
        processor: The model's image processor (default: resize to the model's ``image_size``, mean = std = 0.5),
            or any callable that maps ``images=[PIL images]`` to ``{"pixel_values": ...}``; only one with
            ``save_pretrained`` is saved with the checkpoints and the adapter.
        data_args: The image column and the image checks (``on_bad_image``, ``image_check``).
        callbacks: ``TrainerCallback`` objects added to the ``Trainer``.

    Raises:
        UnsupportedModelError: a family that cannot be distilled this way (SigLIP2, ViTMAE), or an unlock option the
            family lacks.
        InvalidConfigError: a shift that leaves a view without any patch of the image, a ``PeftModel``, a
            checkpoint that does not fit, a ``push_to_hub`` that cannot create its repository.
        DataError: no images, no image column, unreadable images or images smaller than the patch grid.

    All of these are raised before any forward pass.

    Example:

    >>> from register_adapter.methods.distillation import PHRegConfig, distill_registers
    >>> from register_adapter.training.distillation import DistillationTrainingArguments
    >>> model = distill_registers(base, "photos/", PHRegConfig(), DistillationTrainingArguments("out"))  # doctest: +SKIP
    """
    training_args = training_args if training_args is not None else _default_training_args()
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    hub_repo_id = prepare_push(training_args)
    return run_distillation(
        model,
        dataset,
        config or PHRegConfig(),
        training_args,
        processor=processor,
        data_args=data_args or ImageDataArguments(),
        resume=resume,
        hub_repo_id=hub_repo_id,
        callbacks=callbacks,
    )


def _default_training_args() -> TrainingArguments:
    from ...training.distillation import DistillationTrainingArguments

    return DistillationTrainingArguments(output_dir="phreg-registers")


def run_distillation(
    model: nn.Module,
    dataset: Any,
    config: PHRegConfig,
    training_args: TrainingArguments,
    *,
    processor: Any,
    data_args: ImageDataArguments,
    resume: str | None,
    hub_repo_id: str | None,
    base_model_name: str | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> PeftModel:
    """:func:`distill_registers` once the checkpoint to resume from and the Hub repository are known."""
    if isinstance(model, PeftModel):
        raise InvalidConfigError(
            f"distill_registers takes the base model, got a PeftModel ({type(model.get_base_model()).__name__} with "
            f"adapters {sorted(model.peft_config)}). Pass model.get_base_model() or a freshly loaded model."
        )
    tower = find_vision_tower(model)
    check_distillable(tower)
    processor = processor if processor is not None else default_processor(tower)
    if config.cache_targets:
        processor_settings(processor)  # a processor the cache cannot be keyed on is refused now
    images = load_unlabelled_images(dataset, image_column=data_args.image_column_name)
    size = common_output_size(images, processor)
    grid = patch_grid(size, tower.patch_size)
    max_offsets(config.max_shift, grid)
    register_config = RegisterConfig(**config.register_config_kwargs(tower))
    register_config.base_model_name_or_path = model.__dict__.get("name_or_path") or None  # as get_peft_model
    check_unlockable(tower, register_config.unlocked_weights or [])
    if resume is not None:
        check_resume_config(resume, register_config, RESUME_FIELDS)
    splits = {"train": images}
    check_images_once(splits, data_args, training_args, find_problems=lambda split: find_small_images(split, grid))
    data = DistillationImages(splits["train"], processor, tower.patch_size, size)

    student = DistillationStudent(model, register_config)
    teacher = DenoisedTeacher(student, processor=processor, **config.teacher_kwargs())
    if training_args.should_log:
        student.print_trainable_parameters()

    args = dataclasses.replace(training_args, push_to_hub=False, remove_unused_columns=False, label_names=[])
    trainer = RegisterDistillationTrainer(
        student,
        args,
        teacher=teacher,
        config=config,
        train_dataset=data,
        processing_class=processor if hasattr(processor, "save_pretrained") else None,  # saved with checkpoints
        callbacks=callbacks,
    )
    if config.cache_targets:
        trainer.use_cached_targets()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    metrics = {"final loss": _final_loss(trainer), "mean training loss": result.training_loss}
    summary = _summary(config, register_config, args, len(data), trainer.accelerator.num_processes, base_model_name)
    publish(trainer, args, hub_repo_id=hub_repo_id, metrics=metrics, summary=summary)
    peft_model = student.as_peft_model()
    peft_model.card_metadata = {"metrics": metrics, "training": summary}
    return peft_model


def _final_loss(trainer: Trainer) -> float:
    """The last logged training loss (the mean over the run when no step was logged)."""
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return logged[-1] if logged else trainer.state.log_history[-1]["train_loss"]


def _summary(
    config: PHRegConfig,
    register_config: RegisterConfig,
    args: TrainingArguments,
    images: int,
    processes: int,
    base_model_name: str | None,
) -> dict[str, Any]:
    final = getattr(args, "final_learning_rate", None)
    summary = {
        "base model": base_model_name or register_config.base_model_name_or_path,
        "register tokens": config.num_register_tokens,
        "unlocked weights": ", ".join(register_config.unlocked_weights or []) or "none",
        "teacher views": config.num_views,
        "max shift": config.max_shift,
        "flip": config.flip,
        "fill": config.fill,
        "loss": f"{config.cosine_weight} * (1 - cos) + {config.mse_weight} * MSE",
        "target cache": config.cache_targets,
        "training images": images,
        **run_summary(args, processes),
        "weight decay": args.weight_decay,
    }
    if final is not None:
        summary["learning rate"] = f"{args.learning_rate} -> {final} (exponential)"
    return {k: v for k, v in summary.items() if v is not None}

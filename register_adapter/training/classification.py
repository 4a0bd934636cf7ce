"""Train register tokens, a new classification head and optionally LoRA with the HF ``Trainer``.

The command line is ``register-adapter train`` (or ``torchrun --nproc_per_node N -m register_adapter.cli train``,
or ``accelerate launch -m register_adapter.cli train``); every flag of ``transformers.TrainingArguments`` works::

    register-adapter train --model google/vit-base-patch16-224-in21k --train_dir data/train \\
        --validation_dir data/val --num_register_tokens 4 --output_dir vit-registers \\
        --per_device_train_batch_size 64 --num_train_epochs 5 --bf16 --push_to_hub --hub_model_id me/vit-registers

What trains: the register tokens, the new classification head (saved in the adapter through ``modules_to_save``),
and, with ``--lora_r N``, LoRA on the attention projections of the vision tower, all in one adapter that
``PeftModel.from_pretrained`` restores whole. At the end the best checkpoint (by validation accuracy) is saved to
``--output_dir`` with the image processor's config and a model card that holds the evaluation metrics and the
training setup; the adapter config holds the class names (``labels``), so (after ``import register_adapter``)
``AutoModelForImageClassification.from_pretrained(output_dir)`` and ``pipeline("image-classification",
model=output_dir)`` give the trained classifier with its labels when ``--model`` was a Hub id or a folder.

From Python:

>>> from register_adapter.training.classification import parse_args, train
>>> args = parse_args(["--model", "tiny-vit", "--train_dir", "data/train", "--output_dir", "out"])  # doctest: +SKIP
>>> trainer = train(*args)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import IMAGE_PROCESSOR_NAME

from ..architectures import find_vision_tower
from ..errors import InvalidConfigError, UnsupportedModelError
from ..hub import EvalSetting
from ..loading import check_model, load_model
from ..sources import BAD_IMAGE_POLICIES, IMAGE_CHECKS, check_choice
from ..tiny import TINY_MODELS, supported_tiny_models
from ..tuner import add_registers
from .arguments import (
    AdapterTrainingArguments,
    ImageDataArguments,
    ModelArguments,
    RegisterArguments,
    model_field,
    parse_dataclasses,
    register_config_kwargs,
)
from .augment import ImageClassificationTransform, apply_transforms
from .data import LABEL_COLUMN, load_image_dataset, take_samples
from .metrics import TOP_K, ClassificationMetrics, metric_names, top_k_predictions
from .runtime import (
    check_images_once,
    check_resume_config,
    prepare_push,
    publish,
    resolve_checkpoint,
    run_summary,
)

logger = logging.getLogger(__name__)

PROG = "register-adapter train"
# Adapter settings that change the trainable parameters: a checkpoint saved with other values cannot be resumed.
RESUME_FIELDS = ("num_register_tokens", "lora_r", "lora_target_modules", "modules_to_save")


def classification_tiny_models() -> list[str]:
    """The built-in tiny models that ``register-adapter train`` can train: those with an image-classification class."""
    return [name for name in supported_tiny_models() if "classification" in TINY_MODELS[name][2]]


@dataclass
class ClassificationModelArguments(ModelArguments):
    """Which image-classification model to add registers and a new head to."""

    model: str = model_field(classification_tiny_models())


@dataclass
class ClassificationDataArguments(ImageDataArguments):
    """Which labelled images to train and evaluate on, and how to treat bad ones."""

    train_dir: str | None = field(
        default=None, metadata={"help": "Training images in imagefolder layout: train_dir/<class name>/<image>."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Validation images in imagefolder layout, with the training folder's classes."}
    )
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of --dataset_name to evaluate on; it must exist. Default: 'validation' if the dataset has "
            "it, else images held out with --train_val_split."
        },
    )
    label_column_name: str = field(default="label", metadata={"help": "Column of --dataset_name holding the labels."})
    train_val_split: float = field(
        default=0.15,
        metadata={
            "help": "Fraction of the training images held out for validation when there is no validation split; "
            "0 trains on all of them and evaluates nothing."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only this many validation images, drawn at random (for quick runs)."}
    )
    augment: bool = field(
        default=True, metadata={"help": "Random resized crop and horizontal flip on training images."}
    )


@dataclass
class ClassificationTrainingArguments(AdapterTrainingArguments):
    """:class:`~register_adapter.training.arguments.AdapterTrainingArguments` that pick the best checkpoint by
    validation accuracy."""

    metric_for_best_model: str | None = field(
        default="accuracy",
        metadata={
            "help": "Metric that picks the best checkpoint: loss, accuracy, or top5_accuracy (more than 5 classes); "
            "with or without the eval_ prefix."
        },
    )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[
    ClassificationModelArguments, ClassificationDataArguments, RegisterArguments, ClassificationTrainingArguments
]:
    """Parse ``register-adapter train`` arguments (or one ``.json``/``.yaml`` file holding them)."""
    return parse_dataclasses(
        (
            ClassificationModelArguments,
            ClassificationDataArguments,
            RegisterArguments,
            ClassificationTrainingArguments,
        ),
        argv,
        prog=PROG,
        usage="%(prog)s --model MODEL (--train_dir DIR | --dataset_name NAME) --output_dir DIR [options]",
    )


def head_modules(model: transformers.PreTrainedModel) -> list[str]:
    """Names of the modules outside the vision tower that hold weights: the classification head(s).

    They are new (or task-specific) and must be trained and saved with the registers through ``modules_to_save``.
    """
    tower = find_vision_tower(model)
    tower_root = tower.path.split(".")[0]
    heads = [
        name for name, child in model.named_children() if name != tower_root and any(True for _ in child.parameters())
    ]
    if not tower.path or not heads:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no classification head outside its vision tower; train registers on an "
            "image-classification model (e.g. ViTForImageClassification)."
        )
    return heads


class _AugmentationEpoch(TrainerCallback):
    """Tells the training transform which epoch starts, so each epoch draws new, reproducible augmentations."""

    def __init__(self, transform: ImageClassificationTransform) -> None:
        self.transform = transform

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # state.epoch is the integer epoch at an epoch boundary and a fraction inside the epoch a run resumes in.
        self.transform.epoch = math.floor(state.epoch or 0)


def check_metric_for_best_model(name: str | None, num_labels: int) -> None:
    """Refuse a ``--metric_for_best_model`` that evaluation will not report; the ``Trainer`` would stop with a
    ``KeyError`` after the first evaluation. Names are accepted with or without ``eval_``, as the ``Trainer`` does.

    Raises:
        InvalidConfigError: the name is not one of :func:`~register_adapter.metrics.metric_names`.
    """
    valid = metric_names(num_labels)
    if name is None or name.removeprefix("eval_") in valid:
        return
    top_k = f"top{TOP_K}_accuracy"
    note = (
        f"; {top_k} needs more than {TOP_K} classes, the training data has {num_labels}" if top_k not in valid else ""
    )
    raise InvalidConfigError(
        f"--metric_for_best_model {name!r} is not a metric that evaluation reports. Valid names: {', '.join(valid)} "
        f"(with or without the eval_ prefix){note}."
    )


def _training_summary(
    model_args: ModelArguments, register_args: Any, args: TrainingArguments, splits: datasets.DatasetDict, world: int
) -> dict[str, Any]:
    return {
        "base model": model_args.model,
        **dataclasses.asdict(register_args),
        "training images": len(splits["train"]),
        "validation images": len(splits["validation"]) if "validation" in splits else 0,
        "classes": splits["train"].features[LABEL_COLUMN].num_classes,
        **run_summary(args, world),
    }


def _evaluated_on(data_args: ClassificationDataArguments) -> EvalSetting:
    """The dataset the validation metrics come from, for the card's ``model-index``."""
    if data_args.dataset_name is not None:
        split = data_args.validation_split or "validation"
        return EvalSetting("image-classification", data_args.dataset_name, data_args.dataset_name, split)
    folder = data_args.validation_dir or data_args.train_dir
    split = "validation" if data_args.validation_dir else f"{data_args.train_val_split:g} held out of train"
    return EvalSetting("image-classification", Path(folder).resolve().name, "imagefolder", split)


def train(
    model_args: ModelArguments,
    data_args: ClassificationDataArguments,
    register_args: RegisterArguments,
    training_args: TrainingArguments,
) -> Trainer:
    """Add registers to a classification model, train them (with the head, optionally LoRA), save the best adapter.

    Every problem with the inputs (a missing folder or column, a bad label, unreadable images, an unsupported model
    family, a ``--metric_for_best_model`` that evaluation does not report, a checkpoint saved with other adapter
    settings) is raised before the first training step; a ``--resume_from_checkpoint`` without a checkpoint, a
    ``--push_to_hub`` that cannot create its repository and a ``--model`` that cannot be found before any data loads.

    Returns:
        The ``Trainer``; ``trainer.model`` is the ``PeftModel`` holding the best (or last) adapter.

    Raises:
        DataError: the data cannot be used (see :mod:`register_adapter.training.data`).
        InvalidConfigError: ``--resume_from_checkpoint`` names no checkpoint (see :func:`resolve_checkpoint`) or one
            with other adapter settings (see :func:`check_resume_config`); ``--metric_for_best_model`` is not reported
            (see :func:`check_metric_for_best_model`); ``--push_to_hub`` cannot create its repository (see
            :func:`create_hub_repo`).
        UnsupportedModelError: the model family cannot take registers or has no classification head.
    """
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_choice("on_bad_image", data_args.on_bad_image, BAD_IMAGE_POLICIES)
    check_choice("image_check", data_args.image_check, IMAGE_CHECKS)
    hub_repo_id = prepare_push(training_args)
    model_kwargs = model_args.load_kwargs()
    check_model(model_args.model, **{k: model_kwargs[k] for k in ("revision", "cache_dir", "trust_remote_code")})
    transformers.set_seed(training_args.seed)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    with training_args.main_process_first(desc="loading the dataset"):
        splits = load_image_dataset(
            train_dir=data_args.train_dir,
            validation_dir=data_args.validation_dir,
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            train_split=data_args.train_split,
            validation_split=data_args.validation_split,
            image_column=data_args.image_column_name,
            label_column=data_args.label_column_name,
            train_val_split=data_args.train_val_split,
            seed=seed,
            cache_dir=model_args.cache_dir,
            on_bad_label=data_args.on_bad_image,
        )
    labels = splits["train"].features[LABEL_COLUMN].names
    if "validation" in splits:
        check_metric_for_best_model(training_args.metric_for_best_model, len(labels))

    model, image_processor = load_model(model_args.model, "classification", labels=labels, **model_kwargs)
    model = add_registers(
        model, modules_to_save=head_modules(model), labels=labels, **register_config_kwargs(register_args)
    )
    if resume is not None:
        check_resume_config(resume, model.peft_config["default"], RESUME_FIELDS)
    if training_args.should_log:
        model.print_trainable_parameters()

    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    for name in list(splits):
        splits[name] = take_samples(splits[name], limits[name], seed)
    check_images_once(splits, data_args, training_args)
    train_transform = apply_transforms(splits, image_processor, seed=seed, augment=data_args.augment)

    if training_args.dataloader_persistent_workers:
        logger.warning(
            "--dataloader_persistent_workers is turned off: workers would keep the first epoch's augmentation."
        )
    # Persistent data-loader workers keep their own copy of the transform and would never see the new epoch that
    # _AugmentationEpoch sets, so every epoch would get the same augmentation.
    overrides: dict[str, Any] = {
        "push_to_hub": False,
        "remove_unused_columns": False,
        "dataloader_persistent_workers": False,
    }
    if training_args.label_names is None:
        overrides["label_names"] = ["labels"]  # PeftModel.forward takes **kwargs, so the Trainer cannot infer it
    if "validation" not in splits and training_args.eval_strategy != "no":
        logger.warning("No validation images: evaluation and best-checkpoint selection are turned off.")
        overrides.update(eval_strategy="no", load_best_model_at_end=False, metric_for_best_model=None)
    args = dataclasses.replace(training_args, **overrides)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        processing_class=image_processor,
        compute_metrics=ClassificationMetrics(len(labels)),
        preprocess_logits_for_metrics=top_k_predictions,
        callbacks=[_AugmentationEpoch(train_transform)],
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics: dict[str, Any] = {}
    if "validation" in splits:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card_metrics = {k: v for k, v in metrics.items() if k.endswith("accuracy") or k == "eval_loss"}
    summary = _training_summary(model_args, register_args, args, splits, trainer.accelerator.num_processes)
    # The adapter config holds the labels; the Trainer saved the processor's config. No config.json: next to it,
    # transformers would take the folder for a full model rather than an adapter of its base model.
    publish(
        trainer,
        args,
        hub_repo_id=hub_repo_id,
        metrics=card_metrics,
        summary=summary,
        evaluated_on=_evaluated_on(data_args) if "validation" in splits else None,
        extra_files=(IMAGE_PROCESSOR_NAME,),
    )
    return trainer

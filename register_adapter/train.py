"""Train register tokens, a new classification head and optionally LoRA with the HF ``Trainer``.

The command line is ``register-adapter train`` (or ``torchrun --nproc_per_node N -m register_adapter.cli train``,
or ``accelerate launch -m register_adapter.cli train``); every flag of ``transformers.TrainingArguments`` works::

    register-adapter train --model google/vit-base-patch16-224-in21k --train_dir data/train \\
        --validation_dir data/val --num_register_tokens 4 --output_dir vit-registers \\
        --per_device_train_batch_size 64 --num_train_epochs 5 --bf16 --push_to_hub --hub_model_id me/vit-registers

What trains: the register tokens, the new classification head (saved in the adapter through ``modules_to_save``),
and, with ``--lora_r N``, LoRA on the attention projections of the vision tower, all in one adapter that
``PeftModel.from_pretrained`` restores whole. At the end the best checkpoint (by validation accuracy) is saved to
``--output_dir`` with the base model's ``config.json`` (its labels), the image processor's config and a model card
that holds the evaluation metrics and the training setup.

From Python:

>>> from register_adapter.train import parse_args, train
>>> args = parse_args(["--model", "tiny-vit", "--train_dir", "data/train", "--output_dir", "out"])  # doctest: +SKIP
>>> trainer = train(*args)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate.utils import broadcast_object_list
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from peft import PeftConfig
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME

from .architectures import find_vision_tower
from .config import RegisterConfig
from .data import (
    BAD_IMAGE_POLICIES,
    IMAGE_CHECKS,
    LABEL_COLUMN,
    ImageClassificationTransform,
    apply_transforms,
    check_choice,
    drop_unreadable_images,
    find_unreadable_images,
    load_image_dataset,
    take_samples,
)
from .errors import InvalidConfigError, RegisterAdapterError, UnsupportedModelError
from .hub import push_to_hub, render_model_card
from .metrics import TOP_K, ClassificationMetrics, metric_names, top_k_predictions
from .model import add_registers
from .tiny import TINY_MODELS, build_tiny_model, tiny_image_size

logger = logging.getLogger(__name__)

# RegisterConfig fields that are filled in from the model or by this module, not chosen on the command line.
_AUTOMATIC_REGISTER_FIELDS = (
    "family",
    "hidden_size",
    "native_register_tokens",
    "target_modules",
    "modules_to_save",
    "method",
)
# Adapter settings that change the trainable parameters: a checkpoint saved with other values cannot be resumed.
_RESUME_FIELDS = ("num_register_tokens", "lora_r", "lora_target_modules", "modules_to_save")


def _choice(choices: tuple[str, ...], help_text: str) -> Any:
    """A string argument whose default is the first of ``choices``."""
    return field(default=choices[0], metadata={"help": help_text, "choices": list(choices)})


@dataclass
class ModelArguments:
    """Which model to add registers to."""

    model: str = field(
        metadata={
            "help": "Path or Hub id of a pretrained vision transformer (ViT, DeiT, DINOv2, CLIP, ...), or the name of "
            f"a built-in tiny model for offline runs ({', '.join(sorted(TINY_MODELS))})."
        }
    )
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to cache downloaded models and datasets (default: the HF cache)."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation: eager, sdpa or flash_attention_2."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Replace a pretrained classification head whose size does not fit the labels by a new one."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository (only for repositories you trust)."}
    )


@dataclass
class DataArguments:
    """Which images to train on, and how to treat bad ones."""

    train_dir: str | None = field(
        default=None, metadata={"help": "Training images in imagefolder layout: train_dir/<class name>/<image>."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Validation images in imagefolder layout, with the training folder's classes."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A datasets dataset instead of folders: Hub name, loading script, or a save_to_disk folder."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of --dataset_name to evaluate on; it must exist. Default: 'validation' if the dataset has "
            "it, else images held out with --train_val_split."
        },
    )
    image_column_name: str = field(default="image", metadata={"help": "Column of --dataset_name holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column of --dataset_name holding the labels."})
    train_val_split: float = field(
        default=0.15,
        metadata={
            "help": "Fraction of the training images held out for validation when there is no validation split; "
            "0 trains on all of them and evaluates nothing."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only this many training images, drawn at random (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only this many validation images, drawn at random (for quick runs)."}
    )
    on_bad_image: str = _choice(
        BAD_IMAGE_POLICIES,
        "What to do with images that cannot be read and rows without a usable label (missing, or not a class "
        "id), found before training starts: 'error' stops with a list of them, 'skip' leaves them out with a "
        "warning.",
    )
    image_check: str = _choice(
        IMAGE_CHECKS,
        "How to check images before training: 'decode' every image (finds truncated files), 'header' only "
        "(faster; truncated files pass and fail when training reads them), or 'none'.",
    )
    augment: bool = field(
        default=True, metadata={"help": "Random resized crop and horizontal flip on training images."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for checking the images before training."}
    )


def _register_arguments_class() -> type:
    """``RegisterArguments``: the fields of :class:`RegisterConfig` that a user chooses, as command-line arguments.

    Built from ``RegisterConfig`` itself so that the command line always offers the config's current fields, with
    the config's defaults and help texts.
    """
    hints = typing.get_type_hints(RegisterConfig)
    base_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    fields = []
    for config_field in dataclasses.fields(RegisterConfig):
        if config_field.name in base_fields or config_field.name in _AUTOMATIC_REGISTER_FIELDS:
            continue
        default = (
            field(default_factory=config_field.default_factory, metadata=config_field.metadata)
            if config_field.default_factory is not dataclasses.MISSING
            else field(default=config_field.default, metadata=config_field.metadata)
        )
        fields.append((config_field.name, hints[config_field.name], default))
    return dataclasses.make_dataclass(
        "RegisterArguments",
        fields,
        namespace={"__doc__": "The RegisterConfig fields chosen on the command line.", "__module__": __name__},
    )


RegisterArguments = _register_arguments_class()


@dataclass
class RegisterTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with defaults for training registers and a head.

    Evaluation follows ``--save_strategy`` (every epoch by default, or every ``--save_steps``) and the checkpoint with
    the best validation accuracy is loaded at the end (by default only when every saved checkpoint is evaluated, which
    ``TrainingArguments`` requires for it); the learning rate suits adapter parameters (registers, head, LoRA) rather
    than full fine-tuning.
    """

    learning_rate: float = field(
        default=1e-3, metadata={"help": "Initial AdamW learning rate (adapter parameters train well at 1e-3)."}
    )
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint: no, steps or epoch."})
    eval_strategy: str | None = field(
        default=None, metadata={"help": "When to evaluate: no, steps or epoch. Default: as --save_strategy."}
    )
    load_best_model_at_end: bool | None = field(
        default=None,
        metadata={
            "help": "Load the checkpoint with the best --metric_for_best_model at the end. Default: yes when "
            "every saved checkpoint is evaluated (--eval_strategy as --save_strategy, --save_steps a multiple of "
            "--eval_steps)."
        },
    )
    metric_for_best_model: str | None = field(
        default="accuracy",
        metadata={
            "help": "Metric that picks the best checkpoint: loss, accuracy, or top5_accuracy (more than 5 classes); "
            "with or without the eval_ prefix."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: images are preprocessed lazily from the raw columns."},
    )

    def __post_init__(self) -> None:
        save = str(getattr(self.save_strategy, "value", self.save_strategy))
        if self.eval_strategy is None:
            self.eval_strategy = save
            if save == "steps" and self.eval_steps is None:
                self.eval_steps = self.save_steps
        evaluate = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        if self.load_best_model_at_end is None:
            eval_steps = self.eval_steps or self.logging_steps  # as TrainingArguments fills in eval_steps
            self.load_best_model_at_end = _best_model_loadable(save, evaluate, self.save_steps, eval_steps)
            if not self.load_best_model_at_end and save != "no" and evaluate != "no":
                logger.warning(
                    "Not loading the best checkpoint at the end: --load_best_model_at_end needs every saved checkpoint "
                    "evaluated, which --save_strategy %s with --eval_strategy %s does not do. Use the same strategy "
                    "for both (with steps, --save_steps a multiple of --eval_steps) to turn it on.",
                    save,
                    evaluate,
                )
        super().__post_init__()


def _best_model_loadable(save: str, evaluate: str, save_steps: float, eval_steps: float) -> bool:
    """Whether ``TrainingArguments`` accepts ``load_best_model_at_end`` with these strategies: every saved checkpoint
    must have been evaluated (same strategy, ``save_steps`` a multiple of ``eval_steps``), or ``save_strategy="best"``.
    """
    if save == "best":
        return evaluate != "no"
    if save == "no" or evaluate != save:
        return False
    if save != "steps":
        return True
    if (save_steps < 1) != (eval_steps < 1):  # a ratio of the run and a step count
        return False
    multiple = save_steps / eval_steps
    return math.isclose(multiple, round(multiple))


def parse_args(argv: list[str] | None = None) -> tuple[Any, Any, Any, RegisterTrainingArguments]:
    """Parse command-line arguments (or one ``.json``/``.yaml`` file holding them) into the four dataclasses."""
    parser = HfArgumentParser((ModelArguments, DataArguments, RegisterArguments, RegisterTrainingArguments))
    # HfArgumentParser lets a bare --flag mean True only for booleans whose default is not None; ours is None
    # ("decide from the strategies"), and users write a bare --load_best_model_at_end as with TrainingArguments.
    bare_flag = parser._option_string_actions["--load_best_model_at_end"]
    bare_flag.nargs, bare_flag.const = "?", True
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def load_model(model_args: ModelArguments, labels: list[str]) -> tuple[transformers.PreTrainedModel, Any]:
    """The image-classification model with a head for ``labels``, and its image processor (PIL backend).

    Raises:
        UnsupportedModelError: transformers has no image-classification model for this family.
    """
    id2label = dict(enumerate(labels))
    label_kwargs = {"num_labels": len(labels), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if model_args.model in TINY_MODELS:
        model = build_tiny_model(model_args.model, "classification", **label_kwargs)
        size = tiny_image_size(model_args.model)
        processor = transformers.ViTImageProcessorPil(size={"height": size, "width": size})
        return model, processor
    hub_kwargs = {
        "revision": model_args.revision,
        "cache_dir": model_args.cache_dir,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(model_args.model, **label_kwargs, **hub_kwargs)
    try:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            attn_implementation=model_args.attn_implementation,
            **hub_kwargs,
        )
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise UnsupportedModelError(
            f"{model_args.model!r} (model_type={config.model_type!r}) has no image-classification model in "
            "transformers, so no classification head can be trained on it."
        ) from error
    processor = AutoImageProcessor.from_pretrained(model_args.model, backend="pil", **hub_kwargs)
    return model, processor


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


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder that ``--resume_from_checkpoint value`` names; ``None`` to start a new run.

    ``true``/``latest`` is the newest ``checkpoint-N`` folder in ``output_dir``. Checked before any data is loaded.

    Raises:
        InvalidConfigError: no checkpoint to resume from, or a folder without ``trainer_state.json``.
    """
    if value is None or value.lower() in ("", "false", "no", "none"):
        return None
    if value.lower() in ("true", "yes", "latest"):
        latest = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if latest is None:
            raise InvalidConfigError(
                f"--resume_from_checkpoint {value} found no checkpoint-N folder in --output_dir {output_dir!r}. "
                "Leave out --resume_from_checkpoint to start a new run, or pass the path of a checkpoint folder."
            )
        value = latest
    if not Path(value, TRAINER_STATE_NAME).is_file():
        problem = "does not exist" if not Path(value).exists() else f"has no {TRAINER_STATE_NAME}"
        raise InvalidConfigError(
            f"--resume_from_checkpoint {value!r} {problem}, so it is not a checkpoint to resume from. Pass a "
            f"checkpoint-N folder that an earlier run saved in its --output_dir (it holds {TRAINER_STATE_NAME}), "
            "or 'latest' for the newest one in --output_dir."
        )
    return value


def check_resume_config(checkpoint: str, config: RegisterConfig) -> None:
    """Refuse to resume from a checkpoint whose adapter has other trainable parameters than ``config`` gives.

    Its optimizer state would not fit them (``Trainer`` stops with a bare ``ValueError`` from the optimizer), nor would
    its registers, LoRA weights or head. ``lora_target_modules`` counts only where LoRA is on.

    Raises:
        InvalidConfigError: ``num_register_tokens``, ``lora_r``, ``lora_target_modules`` or ``modules_to_save`` of
            the checkpoint's ``adapter_config.json`` differ from ``config``.
    """
    path = Path(checkpoint, ADAPTER_CONFIG_NAME)
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    with_lora = bool(saved.get("lora_r") or config.lora_r)
    differences = [
        f"{name} {_comparable(saved.get(name))!r} in the checkpoint, {_comparable(getattr(config, name))!r} now"
        for name in _RESUME_FIELDS
        if (name != "lora_target_modules" or with_lora)
        and _comparable(saved.get(name)) != _comparable(getattr(config, name))
    ]
    if differences:
        raise InvalidConfigError(
            f"--resume_from_checkpoint {checkpoint!r} holds an adapter with other settings: {'; '.join(differences)}. "
            "Resume with the checkpoint's settings, or leave out --resume_from_checkpoint to start a new run."
        )


def _comparable(value: Any) -> Any:
    """Module lists compare as sorted lists (PEFT may hold them as sets)."""
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


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


def create_hub_repo(training_args: TrainingArguments) -> str:
    """Create (or find) the Hub repository that ``--push_to_hub`` uploads to, so a push that cannot work stops the run
    before training rather than after it. Returns the repository id.

    Raises:
        InvalidConfigError: no token, offline mode (``HF_HUB_OFFLINE``), or the Hub refused or could not be reached.
    """
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
    cannot = f"--push_to_hub cannot create the Hub repository {repo_id!r}"
    token = training_args.hub_token or get_token()
    if token is None:
        raise InvalidConfigError(
            f"{cannot}: no Hugging Face token was found. Log in with `hf auth login`, set HF_TOKEN or pass "
            "--hub_token; or leave out --push_to_hub."
        )
    try:
        return HfApi(token=token).create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True).repo_id
    except OfflineModeIsEnabled as error:
        raise InvalidConfigError(
            f"{cannot}: offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to push, or leave out "
            "--push_to_hub."
        ) from error
    except HfHubHTTPError as error:
        raise InvalidConfigError(
            f"{cannot}: the Hub refused ({error}). Check that the token may write to that namespace "
            "(--hub_model_id, --hub_token), or leave out --push_to_hub."
        ) from error
    except Exception as error:  # network failures (httpx, OSError) share no base class
        raise InvalidConfigError(
            f"{cannot}: {type(error).__name__}: {error}. Check the network connection, or leave out --push_to_hub."
        ) from error


def _prepare_push(training_args: TrainingArguments) -> str | None:
    """The repository ``--push_to_hub`` uploads to (``None`` without it), created on the main process only.

    Every process raises the main process's error, rather than waiting for it at the next collective.
    """
    if not training_args.push_to_hub:
        return None
    repo_id, problem = None, None
    if training_args.process_index == 0:
        try:
            repo_id = create_hub_repo(training_args)
        except InvalidConfigError as error:
            problem = str(error)
    if training_args.world_size > 1:
        repo_id, problem = broadcast_object_list([repo_id, problem])
    if problem is not None:
        raise InvalidConfigError(problem)
    return repo_id


def _check_images(splits: datasets.DatasetDict, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Open every image once, on the main process, and apply ``--on_bad_image`` on every process.

    ``main_process_first`` would only order the processes: a dataset built in memory (an image folder) has no cache
    file for ``datasets`` to share, so every process would decode every image again. Instead the main process reads
    them and sends the unreadable ones to the others, which then keep or refuse exactly the same images.
    """
    problems: dict[str, dict[int, str]] = {}
    if training_args.process_index == 0:
        for name, split in splits.items():
            problems[name] = find_unreadable_images(
                split, check=data_args.image_check, split=name, num_proc=data_args.preprocessing_num_workers
            )
    if training_args.world_size > 1:
        problems = broadcast_object_list([problems])[0]
    for name in list(splits):
        splits[name] = drop_unreadable_images(
            splits[name], problems[name], on_bad_image=data_args.on_bad_image, split=name
        )


def _training_summary(
    model_args: ModelArguments, register_args: Any, args: TrainingArguments, splits: datasets.DatasetDict, world: int
) -> dict[str, Any]:
    summary = {
        "base model": model_args.model,
        **dataclasses.asdict(register_args),
        "training images": len(splits["train"]),
        "validation images": len(splits["validation"]) if "validation" in splits else 0,
        "classes": splits["train"].features[LABEL_COLUMN].num_classes,
        "learning rate": args.learning_rate,
        "global batch size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "max steps": args.max_steps if args.max_steps > 0 else None,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "processes": world,
        "seed": args.seed,
    }
    return {k: v for k, v in summary.items() if v is not None}


def train(
    model_args: ModelArguments, data_args: DataArguments, register_args: Any, training_args: TrainingArguments
) -> Trainer:
    """Add registers to a classification model, train them (with the head, optionally LoRA), save the best adapter.

    Every problem with the inputs (a missing folder or column, a bad label, unreadable images, an unsupported model
    family, a ``--metric_for_best_model`` that evaluation does not report, a checkpoint saved with other adapter
    settings) is raised before the first training step; a ``--resume_from_checkpoint`` without a checkpoint and a
    ``--push_to_hub`` that cannot create its repository before any data loads.

    Returns:
        The ``Trainer``; ``trainer.model`` is the ``PeftModel`` holding the best (or last) adapter.

    Raises:
        DataError: the data cannot be used (see :mod:`register_adapter.data`).
        InvalidConfigError: ``--resume_from_checkpoint`` names no checkpoint (see :func:`resolve_checkpoint`) or one
            with other adapter settings (see :func:`check_resume_config`); ``--metric_for_best_model`` is not reported
            (see :func:`check_metric_for_best_model`); ``--push_to_hub`` cannot create its repository (see
            :func:`create_hub_repo`).
        UnsupportedModelError: the model family cannot take registers or has no classification head.
    """
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_choice("on_bad_image", data_args.on_bad_image, BAD_IMAGE_POLICIES)
    check_choice("image_check", data_args.image_check, IMAGE_CHECKS)
    hub_repo_id = _prepare_push(training_args)
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

    model, image_processor = load_model(model_args, labels)
    model = add_registers(model, modules_to_save=head_modules(model), **dataclasses.asdict(register_args))
    if resume is not None:
        check_resume_config(resume, model.peft_config["default"])
    if training_args.should_log:
        model.print_trainable_parameters()

    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    for name in list(splits):
        splits[name] = take_samples(splits[name], limits[name], seed)
    _check_images(splits, data_args, training_args)
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

    if trainer.is_world_process_zero():
        card_metrics = {k: v for k, v in metrics.items() if k.endswith("accuracy") or k == "eval_loss"}
        summary = _training_summary(model_args, register_args, args, splits, trainer.accelerator.num_processes)
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        card = render_model_card(
            peft_model, repo_id=hub_repo_id or training_args.hub_model_id, metrics=card_metrics, training=summary
        )
        card.save(os.path.join(args.output_dir, "README.md"))
        # The base model's config holds the labels (id2label); the Trainer saved the processor's config.
        peft_model.get_base_model().config.save_pretrained(args.output_dir)
        if hub_repo_id is not None:
            url = push_to_hub(
                peft_model,
                hub_repo_id,
                private=training_args.hub_private_repo,
                token=training_args.hub_token,
                revision=training_args.hub_revision,
                metrics=card_metrics,
                training=summary,
                extra_files=[os.path.join(args.output_dir, name) for name in (CONFIG_NAME, IMAGE_PROCESSOR_NAME)],
            )
            logger.info("Pushed the adapter to %s", url)
    return trainer


def main(argv: list[str] | None = None) -> int:
    """``register-adapter train``: parse the arguments, train, return an exit status (2 for bad input)."""
    model_args, data_args, register_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stderr)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    logging.getLogger("register_adapter").setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    try:
        train(model_args, data_args, register_args, training_args)
    except RegisterAdapterError as error:
        logger.error("%s", error)
        return 2
    # A process group left to the interpreter's exit can abort a rank (SIGABRT) while gloo's threads still hold
    # tensors. Only after success: destroying it while another rank is in a collective would hang.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

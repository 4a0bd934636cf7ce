"""Command-line arguments shared by the training commands, as dataclasses that ``HfArgumentParser`` turns into flags.

Each command lists its own dataclasses: ``register-adapter train`` takes :class:`ModelArguments`,
:class:`~register_adapter.training.classification.ClassificationDataArguments`, :class:`RegisterArguments` and
:class:`~register_adapter.training.classification.ClassificationTrainingArguments`. The adapter flags are an explicit
list (:class:`RegisterArguments`), so a field added to :class:`~register_adapter.RegisterConfig` is not offered on a
command line by accident.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from ..sources import BAD_IMAGE_POLICIES, IMAGE_CHECKS
from ..tiny import supported_tiny_models
from ..tuner.config import INIT_METHODS, RegisterConfig

logger = logging.getLogger(__name__)


def choice(choices: tuple[str, ...], help_text: str) -> Any:
    """A string argument whose default is the first of ``choices``."""
    return field(default=choices[0], metadata={"help": help_text, "choices": list(choices)})


def model_field(tiny_models: list[str]) -> Any:
    """The ``--model`` flag, offering the built-in ``tiny_models`` (those the command can run)."""
    return field(
        metadata={
            "help": "Path or Hub id of a pretrained vision transformer (ViT, DeiT, DINOv2, CLIP, ...), or the name of "
            f"a built-in tiny model for offline runs ({', '.join(tiny_models)})."
        }
    )


@dataclass
class ModelArguments:
    """Which model to add registers to."""

    model: str = model_field(supported_tiny_models())
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to cache downloaded models and datasets (default: the HF cache)."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation: eager, sdpa or flash_attention_2."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository (only for repositories you trust)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Replace a pretrained classification head whose size does not fit the labels by a new one."},
    )

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`register_adapter.loading.load_model` these arguments set."""
        return {
            "revision": self.revision,
            "cache_dir": self.cache_dir,
            "attn_implementation": self.attn_implementation,
            "trust_remote_code": self.trust_remote_code,
            "ignore_mismatched_sizes": self.ignore_mismatched_sizes,
        }


@dataclass
class ImageDataArguments:
    """Which images to train on, and how to treat bad ones; no labels needed."""

    train_dir: str | None = field(
        default=None, metadata={"help": "Training images: a folder (searched recursively for image files)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A datasets dataset instead of folders: Hub name, loading script, or a save_to_disk folder."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    image_column_name: str = field(default="image", metadata={"help": "Column of --dataset_name holding the images."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only this many training images, drawn at random (for quick runs)."}
    )
    on_bad_image: str = choice(
        BAD_IMAGE_POLICIES,
        "What to do with images that cannot be read and rows without a usable label (missing, or not a class "
        "id), found before training starts: 'error' stops with a list of them, 'skip' leaves them out with a "
        "warning.",
    )
    image_check: str = choice(
        IMAGE_CHECKS,
        "How to check images before training: 'decode' every image (finds truncated files), 'header' only "
        "(faster; truncated files pass and fail when training reads them), or 'none'.",
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for checking the images before training."}
    )


def config_field(name: str, **metadata: Any) -> Any:
    """The ``RegisterConfig`` field ``name`` as a flag: its default and help (``metadata`` adds to them)."""
    source = RegisterConfig.__dataclass_fields__[name]
    metadata = {**source.metadata, **metadata}
    if source.default_factory is not dataclasses.MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default, metadata=metadata)


@dataclass
class RegisterArguments:
    """The register-adapter settings a user chooses on the command line (fields of ``RegisterConfig``)."""

    num_register_tokens: int = config_field("num_register_tokens")
    init: str = config_field("init", choices=list(INIT_METHODS))
    strip_registers: bool = config_field("strip_registers")
    lora_r: int = config_field("lora_r")
    lora_alpha: int = config_field("lora_alpha")
    lora_dropout: float = config_field("lora_dropout")
    lora_target_modules: list[str] = config_field("lora_target_modules")

    def __post_init__(self) -> None:
        # Checked as RegisterConfig checks them, when the flags are parsed: a bad value is a usage error, reported
        # before any data is loaded (InvalidConfigError is a ValueError, which the parser reports).
        RegisterConfig(**register_config_kwargs(self))


@dataclass
class AdapterTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with defaults for training adapter parameters.

    Evaluation follows ``--save_strategy`` (every epoch by default, or every ``--save_steps``) and the checkpoint with
    the best ``--metric_for_best_model`` is loaded at the end (by default only when every saved checkpoint is
    evaluated, which ``TrainingArguments`` requires for it); the learning rate suits adapter parameters (registers, a
    head, LoRA) rather than full fine-tuning.
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


def parse_dataclasses(
    types: tuple[type, ...], argv: list[str] | None, prog: str, usage: str = "%(prog)s [options]"
) -> tuple[Any, ...]:
    """Parse command-line arguments (or one ``.json``/``.yaml`` file holding them) into the dataclasses ``types``.

    Args:
        types: The argument dataclasses.
        argv: The arguments (default ``sys.argv[1:]``).
        prog: The command, as errors and ``--help`` name it.
        usage: The usage line, printed above an error and at the top of ``--help`` (which lists every flag).

    Raises:
        SystemExit: with status 2 after a usage line and one ``<prog>: error: ...`` line, for an unknown, malformed
            or invalid flag (also one that ``TrainingArguments`` refuses, such as ``--bf16`` on a CPU).
    """
    parser = HfArgumentParser(types, prog=prog, usage=usage)
    # HfArgumentParser lets a bare --flag mean True only for booleans whose default is not None; ours is None
    # ("decide from the strategies"), and users write a bare --load_best_model_at_end as with TrainingArguments.
    if "--load_best_model_at_end" in parser._option_string_actions:
        bare_flag = parser._option_string_actions["--load_best_model_at_end"]
        bare_flag.nargs, bare_flag.const = "?", True
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(os.path.abspath(argv[0]))
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(os.path.abspath(argv[0]))
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # a dataclass refused a value, or a file held unknown keys
        parser.error(" ".join(str(error).split()))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parsed)


def register_config_kwargs(register_args: RegisterArguments) -> dict[str, Any]:
    """The ``RegisterConfig`` keyword arguments of the command-line settings."""
    return dataclasses.asdict(register_args)

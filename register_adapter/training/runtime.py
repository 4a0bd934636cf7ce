"""What every training command needs around the ``Trainer``: checkpoints to resume from, the Hub repository to push
to, images checked once across processes, the finished adapter saved with its card, and a command's exit status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate.utils import broadcast_object_list
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from transformers import TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from ..errors import InvalidConfigError, RegisterAdapterError
from ..hub import EvalSetting, push_to_hub, render_model_card
from ..sources import drop_unreadable_in_splits, find_unreadable_images

logger = logging.getLogger(__name__)


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


def check_resume_config(checkpoint: str, config: Any, fields: Sequence[str]) -> None:
    """Refuse to resume from a checkpoint whose adapter has other trainable parameters than ``config`` gives.

    Its optimizer state would not fit them (``Trainer`` stops with a bare ``ValueError`` from the optimizer), nor would
    its registers, LoRA weights or head. ``lora_target_modules`` counts only where LoRA is on.

    Raises:
        InvalidConfigError: one of ``fields`` (e.g. ``num_register_tokens``, ``lora_r``, ``lora_target_modules``,
            ``modules_to_save``) differs between the checkpoint's ``adapter_config.json`` and ``config``.
    """
    path = Path(checkpoint, ADAPTER_CONFIG_NAME)
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    with_lora = bool(saved.get("lora_r") or config.lora_r)
    differences = [
        f"{name} {_comparable(saved.get(name))!r} in the checkpoint, {_comparable(getattr(config, name))!r} now"
        for name in fields
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


def precision(training_args: TrainingArguments) -> str:
    """The mixed precision of a run: ``"bf16"``, ``"fp16"`` or ``"fp32"``."""
    return "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"


def run_summary(training_args: TrainingArguments, processes: int) -> dict[str, Any]:
    """The rows every training command's model card shows about the run: learning rate, global batch size, epochs
    or steps, precision, processes, seed."""
    args = training_args
    summary = {
        "learning rate": args.learning_rate,
        "global batch size": args.per_device_train_batch_size * args.gradient_accumulation_steps * processes,
        "epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "max steps": args.max_steps if args.max_steps > 0 else None,
        "precision": precision(args),
        "processes": processes,
        "seed": args.seed,
    }
    return {k: v for k, v in summary.items() if v is not None}


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


def prepare_push(training_args: TrainingArguments) -> str | None:
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


def check_images_once(
    splits: datasets.DatasetDict | dict[str, datasets.Dataset],
    data_args: Any,
    training_args: TrainingArguments,
    *,
    find_problems: Callable[[datasets.Dataset], dict[int, str]] | None = None,
) -> None:
    """Open every image once, on the main process, and apply ``--on_bad_image`` on every process.

    ``main_process_first`` would only order the processes: a dataset built in memory (an image folder) has no cache
    file for ``datasets`` to share, so every process would decode every image again. Instead the main process reads
    them and sends the unreadable ones to the others, which then keep or refuse exactly the same images. Every split
    is read before any is refused, so one error lists the unreadable images of all of them. ``data_args`` gives
    ``image_check``, ``on_bad_image`` and ``preprocessing_num_workers``; ``find_problems`` finds further images a
    command cannot use (row -> reason), treated as the unreadable ones.
    """
    problems: dict[str, dict[int, str]] = {}
    if training_args.process_index == 0:
        for name, split in splits.items():
            problems[name] = find_unreadable_images(
                split, check=data_args.image_check, split=name, num_proc=data_args.preprocessing_num_workers
            )
            if find_problems is not None:
                problems[name] = {**find_problems(split), **problems[name]}
    if training_args.world_size > 1:
        problems = broadcast_object_list([problems])[0]
    splits.update(drop_unreadable_in_splits(dict(splits), problems, on_bad_image=data_args.on_bad_image))


def run_command(run: Callable[[], Any], log_level: int, *, prog: str = "register-adapter") -> int:
    """Run a training command with logging set up: 0 when it succeeds, 2 for bad input, after one
    ``<prog>: error: <message>`` line on stderr (as argparse reports a bad flag).

    A process group left to the interpreter's exit can abort a rank (SIGABRT) while gloo's threads still hold tensors,
    so it is destroyed after a successful run. Not after an error: destroying it while another rank is in a
    collective would hang.
    """
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stderr)],
    )
    logging.getLogger("register_adapter").setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    try:
        run()
    except RegisterAdapterError as error:
        sys.stderr.write(f"{prog}: error: {' '.join(str(error).split())}\n")
        return 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def publish(
    trainer: transformers.Trainer,
    training_args: TrainingArguments,
    *,
    hub_repo_id: str | None,
    metrics: dict[str, Any],
    summary: dict[str, Any],
    evaluated_on: EvalSetting | None = None,
    extra_files: Sequence[str] = (),
) -> None:
    """On the main process: write the model card (``metrics`` and the training ``summary``) next to the adapter the
    ``Trainer`` saved in ``--output_dir`` and, with ``hub_repo_id``, push adapter, card and ``extra_files`` (names in
    ``--output_dir``) in one commit."""
    if not trainer.is_world_process_zero():
        return
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    output_dir = training_args.output_dir
    card = render_model_card(
        peft_model,
        repo_id=hub_repo_id or training_args.hub_model_id,
        metrics=metrics,
        training=summary,
        evaluated_on=evaluated_on,
    )
    card.save(os.path.join(output_dir, "README.md"))
    if hub_repo_id is not None:
        url = push_to_hub(
            peft_model,
            hub_repo_id,
            private=training_args.hub_private_repo,
            token=training_args.hub_token,
            revision=training_args.hub_revision,
            metrics=metrics,
            training=summary,
            evaluated_on=evaluated_on,
            extra_files=[os.path.join(output_dir, name) for name in extra_files],
        )
        logger.info("Pushed the adapter to %s", url)

"""Model cards and Hub pushes for register adapters.

A push builds the adapter and its card in a temporary folder and uploads it in one commit, as timm's
``push_to_hf_hub`` does.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import transformers
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from peft import PeftModel

from .errors import InvalidConfigError
from .peft_integration import peft_method
from .tuner.config import METHODS, NEURON_MODE_DESCRIPTIONS, RegisterConfig

CARD_TEMPLATE = "adapter_card.md"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _register_config(model: PeftModel, adapter_name: str) -> RegisterConfig:
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, RegisterConfig):
        raise InvalidConfigError(
            f"Adapter {adapter_name!r} is not a register adapter; available adapters: {sorted(model.peft_config)}."
        )
    return config


#: Metric name (without ``eval_``) -> (``model-index`` metric type, display name). Metrics not listed appear in the
#: card's table only.
METRIC_TYPES = {
    "accuracy": ("accuracy", "Accuracy"),
    "top5_accuracy": ("accuracy", "Top-5 accuracy"),
    "corloc": ("corloc", "CorLoc"),
    "outlier_fraction": ("outlier_fraction", "Outlier fraction"),
    "norm_ratio": ("norm_ratio", "Max / median token norm"),
}


@dataclass(frozen=True)
class EvalSetting:
    """What ``metrics`` were measured on, for the card's ``model-index`` (the Hub's evaluation results).

    Attributes:
        task_type: A Hub task id, e.g. ``"image-classification"``, ``"image-feature-extraction"``.
        dataset_name: The dataset's name as shown, e.g. ``"imagenet-1k"`` or a folder's name.
        dataset_type: The Hub dataset id, or ``"imagefolder"`` for local folders.
        dataset_split: The split the metrics were measured on.
    """

    task_type: str
    dataset_name: str
    dataset_type: str = "imagefolder"
    dataset_split: str | None = None


def eval_results(metrics: dict[str, Any], setting: EvalSetting) -> list[EvalResult]:
    """The ``model-index`` entries of ``metrics`` (names with or without ``eval_``; see :data:`METRIC_TYPES`).

    >>> [(r.metric_type, r.metric_name, r.metric_value) for r in eval_results(
    ...     {"eval_accuracy": 0.5, "eval_loss": 1.2}, EvalSetting("image-classification", "pets"))]
    [('accuracy', 'Accuracy', 0.5)]
    """
    results = []
    for name, value in metrics.items():
        known = METRIC_TYPES.get(name.removeprefix("eval_"))
        if known is None or not isinstance(value, (int, float)):
            continue
        results.append(
            EvalResult(
                task_type=setting.task_type,
                dataset_type=setting.dataset_type,
                dataset_name=setting.dataset_name,
                dataset_split=setting.dataset_split,
                metric_type=known[0],
                metric_name=known[1],
                metric_value=float(value),
            )
        )
    return results


def render_model_card(
    model: PeftModel,
    adapter_name: str = "default",
    *,
    repo_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    tags: Sequence[str] = (),
    evaluated_on: EvalSetting | None = None,
) -> ModelCard:
    """Build the model card of a register adapter from ``model_cards/adapter_card.md``.

    Args:
        model: The ``PeftModel`` holding the adapter.
        adapter_name: Which adapter the card describes.
        repo_id: Hub id the card shows in its loading snippet.
        metrics: Evaluation results, e.g. ``{"eval_accuracy": 0.91}``; shown in the card's table and, with
            ``evaluated_on``, as ``model-index`` results that the Hub displays.
        training: Training setup, e.g. ``{"learning_rate": 1e-3, "epochs": 3}``.
        tags: Hub tags added to the card's own.
        evaluated_on: The task and dataset ``metrics`` were measured on.
    """
    config = _register_config(model, adapter_name)
    base = model.get_base_model()
    base_model = config.base_model_name_or_path or base.config._name_or_path or ""
    load_class = type(base).__name__ if hasattr(transformers, type(base).__name__) else "AutoModel"
    load_kwargs = ""
    if load_class.endswith("ForImageClassification") and config.labels is None:
        # The adapter carries a new head but not its labels: the base model must be built for its size.
        load_kwargs = f", num_labels={base.config.num_labels}, ignore_mismatched_sizes=True"
    hub_id = base_model if _is_hub_id(base_model) else None
    lora = ""
    if config.lora_r:
        targets = ", ".join(f"`{name}`" for name in config.lora_target_modules)
        lora = f"rank {config.lora_r}, alpha {config.lora_alpha} on {targets}"
    own = ["register_adapter", "registers", "vision-transformer", str(config.family), f"registers-{config.method}"]
    tags = own + [tag for tag in tags if tag not in own]
    name = base_model.rstrip("/").split("/")[-1] or type(base).__name__
    title = f"{name} with {config.num_register_tokens} register tokens"
    results = eval_results(metrics or {}, evaluated_on) if evaluated_on is not None else []
    card_data = ModelCardData(
        library_name="peft",
        base_model=hub_id,
        tags=tags,
        license=None,
        model_name=(repo_id or title) if results else None,
        eval_results=results or None,
    )
    template = resources.files("register_adapter.model_cards").joinpath(CARD_TEMPLATE)
    with resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data,
            template_path=str(template_path),
            title=title,
            base_model=base_model or f"a {type(base).__name__} built from its config",
            base_model_url=f"https://huggingface.co/{hub_id}" if hub_id else None,
            load_path=base_model or "path/to/the/base/model",
            family=config.family,
            num_register_tokens=config.num_register_tokens,
            method=config.method,
            method_description=METHODS[config.method],
            strip_registers="yes" if config.strip_registers else "no",
            lora=lora,
            unlocked=", ".join(name.replace("_", " ") for name in config.unlocked_weights or []),
            modules_to_save=", ".join(f"`{name}`" for name in config.modules_to_save or []),
            load_class=load_class,
            load_kwargs=load_kwargs,
            labels=config.labels if base_model else None,  # the one-line load needs the base model's path
            repo_id=repo_id or "path/to/this/adapter",
            metrics=_format_values(metrics),
            training=_format_values(training),
            **_test_time_fields(config),
        )


def _test_time_fields(config: RegisterConfig) -> dict[str, Any]:
    """What the card's test-time register section shows: the register neurons by block, how they were found, and
    the edit."""
    if not config.register_neurons:
        return {"neurons": {}}
    by_block: dict[int, list[str]] = {}
    for block, unit in config.register_neurons:
        by_block.setdefault(block, []).append(str(unit))
    edit = NEURON_MODE_DESCRIPTIONS[config.neuron_mode]
    cls = "keeps its activation" if config.keep_cls else "gets 0 (as every token but the registers)"
    return {
        "neurons": {block: ", ".join(units) for block, units in by_block.items()},
        "num_neurons": len(config.register_neurons),
        "neuron_source": config.neuron_source or "given as a list of (block, unit) pairs",
        "neuron_edit": f"{edit}; CLS {cls}",
    }


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hub repository id (``org/name``) rather than a local path."""
    return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def _format_values(values: dict[str, Any] | None) -> dict[str, str]:
    return {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in (values or {}).items()}


def push_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    adapter_name: str | None = None,
    commit_message: str = "Upload register adapter",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    tags: Sequence[str] = (),
    evaluated_on: EvalSetting | None = None,
    extra_files: Sequence[str | os.PathLike] = (),
) -> str:
    """Save the adapter with its model card into a temporary folder and upload it in one commit.

    Works with any ``PeftModel`` that holds a register adapter (also one loaded with ``PeftModel.from_pretrained``).
    ``extra_files`` (e.g. ``preprocessor_config.json``) are uploaded next to the adapter under their own names; a
    ``config.json`` among them would make transformers take a download of the repository for a full model. Returns
    the commit URL.
    """
    adapter_name = adapter_name or model.active_adapter
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        peft_method("save_pretrained")(model, tmp, selected_adapters=[adapter_name])
        folder = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        card = render_model_card(
            model,
            adapter_name,
            repo_id=repo_id,
            metrics=metrics,
            training=training,
            tags=tags,
            evaluated_on=evaluated_on,
        )
        card.save(os.path.join(folder, "README.md"))
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
            for name in sorted(os.listdir(folder))
        ]
        operations += [
            CommitOperationAdd(path_in_repo=os.path.basename(path), path_or_fileobj=os.fspath(path))
            for path in extra_files
        ]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
    return info.commit_url

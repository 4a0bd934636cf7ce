"""Model cards, atomic saves and Hub pushes for register adapters."""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from typing import Any

import transformers
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from peft import PeftModel

from .config import RegisterConfig
from .errors import InvalidConfigError

CARD_TEMPLATE = "adapter_card.md"
METHOD_DESCRIPTIONS = {
    "trained": "trained registers ([arXiv 2309.16588](https://arxiv.org/abs/2309.16588))",
    "distilled": "post-hoc self-distilled registers, PH-Reg ([arXiv 2505.21501](https://arxiv.org/abs/2505.21501))",
    "test-time": "training-free test-time registers ([arXiv 2506.08010](https://arxiv.org/abs/2506.08010))",
}


def _register_config(model: PeftModel, adapter_name: str) -> RegisterConfig:
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, RegisterConfig):
        raise InvalidConfigError(
            f"Adapter {adapter_name!r} is not a register adapter; available adapters: {sorted(model.peft_config)}."
        )
    return config


def render_model_card(
    model: PeftModel,
    adapter_name: str = "default",
    *,
    repo_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> ModelCard:
    """Build the model card of a register adapter from ``model_cards/adapter_card.md``.

    Args:
        model: The ``PeftModel`` holding the adapter.
        adapter_name: Which adapter the card describes.
        repo_id: Hub id the card shows in its loading snippet.
        metrics: Evaluation results, e.g. ``{"eval_accuracy": 0.91}``.
        training: Training setup, e.g. ``{"learning_rate": 1e-3, "epochs": 3}``.
    """
    config = _register_config(model, adapter_name)
    base = model.get_base_model()
    base_model = config.base_model_name_or_path or base.config._name_or_path or "unknown"
    load_class = type(base).__name__ if hasattr(transformers, type(base).__name__) else "AutoModel"
    load_kwargs = f", num_labels={base.config.num_labels}" if load_class.endswith("ForImageClassification") else ""
    lora = ""
    if config.lora_r:
        targets = ", ".join(f"`{name}`" for name in config.lora_target_modules)
        lora = f"rank {config.lora_r}, alpha {config.lora_alpha} on {targets}"
    tags = ["register_adapter", "registers", "vision-transformer", str(config.family), f"registers-{config.method}"]
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model if "/" in base_model and not os.path.isdir(base_model) else None,
        tags=tags,
        license=None,
    )
    template = resources.files("register_adapter.model_cards").joinpath(CARD_TEMPLATE)
    with resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data,
            template_path=str(template_path),
            title=f"{base_model.rstrip('/').split('/')[-1]} with {config.num_register_tokens} register tokens",
            base_model=base_model,
            base_model_url=f"https://huggingface.co/{base_model}" if "/" in base_model else "#",
            family=config.family,
            num_register_tokens=config.num_register_tokens,
            method=config.method,
            method_description=METHOD_DESCRIPTIONS.get(config.method, config.method),
            strip_registers="yes" if config.strip_registers else "no",
            lora=lora,
            modules_to_save=", ".join(f"`{name}`" for name in config.modules_to_save or []),
            load_class=load_class,
            load_kwargs=load_kwargs,
            repo_id=repo_id or "path/to/this/adapter",
            metrics=_format_values(metrics),
            training=_format_values(training),
        )


def _format_values(values: dict[str, Any] | None) -> dict[str, str]:
    return {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in (values or {}).items()}


def atomic_save(model: PeftModel, save_directory: str | os.PathLike, save: Any, **kwargs: Any) -> None:
    """Run ``save(tmp_dir, **kwargs)`` into a temporary folder inside ``save_directory``, then move each file into
    place with ``os.replace``: an interrupted save leaves the previous adapter files as they were."""
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".saving-") as tmp:
        save(tmp, **kwargs)
        for root, _, files in os.walk(tmp):
            relative = os.path.relpath(root, tmp)
            target_dir = os.path.normpath(os.path.join(save_directory, relative))
            os.makedirs(target_dir, exist_ok=True)
            # The config goes last so that a loader never sees a new config next to old weights.
            for name in sorted(files, key=lambda n: n == "adapter_config.json"):
                os.replace(os.path.join(root, name), os.path.join(target_dir, name))


def push_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    adapter_name: str | None = None,
    commit_message: str = "Upload register adapter",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> str:
    """Save the adapter with its model card into a temporary folder and upload it in one commit.

    Works with any ``PeftModel`` that holds a register adapter (also one loaded with ``PeftModel.from_pretrained``).
    Returns the commit URL.
    """
    adapter_name = adapter_name or model.active_adapter
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        PeftModel.save_pretrained(model, tmp, selected_adapters=[adapter_name])
        folder = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        card = render_model_card(model, adapter_name, repo_id=repo_id, metrics=metrics, training=training)
        card.save(os.path.join(folder, "README.md"))
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
            for name in sorted(os.listdir(folder))
        ]
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return info.commit_url

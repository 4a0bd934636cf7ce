"""Model cards, atomic saves and Hub pushes for register adapters."""

from __future__ import annotations

import functools
import inspect
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import transformers
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from peft import PeftModel

from .config import RegisterConfig
from .errors import InvalidConfigError

CARD_TEMPLATE = "adapter_card.md"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
STALE_SAVE_PREFIX = ".saving-"
SAFETENSORS_ONLY = (
    "Register adapters are saved as safetensors only (adapter_model.safetensors): a pickled adapter_model.bin can run "
    "code when it is loaded. Leave safe_serialization at its default (True)."
)
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
    tags: Sequence[str] = (),
) -> ModelCard:
    """Build the model card of a register adapter from ``model_cards/adapter_card.md``.

    Args:
        model: The ``PeftModel`` holding the adapter.
        adapter_name: Which adapter the card describes.
        repo_id: Hub id the card shows in its loading snippet.
        metrics: Evaluation results, e.g. ``{"eval_accuracy": 0.91}``.
        training: Training setup, e.g. ``{"learning_rate": 1e-3, "epochs": 3}``.
        tags: Hub tags added to the card's own.
    """
    config = _register_config(model, adapter_name)
    base = model.get_base_model()
    base_model = config.base_model_name_or_path or base.config._name_or_path or ""
    load_class = type(base).__name__ if hasattr(transformers, type(base).__name__) else "AutoModel"
    load_kwargs = ""
    if load_class.endswith("ForImageClassification"):
        # The adapter carries a new head: its size need not match the checkpoint's.
        load_kwargs = f", num_labels={base.config.num_labels}, ignore_mismatched_sizes=True"
    hub_id = base_model if _is_hub_id(base_model) else None
    lora = ""
    if config.lora_r:
        targets = ", ".join(f"`{name}`" for name in config.lora_target_modules)
        lora = f"rank {config.lora_r}, alpha {config.lora_alpha} on {targets}"
    own = ["register_adapter", "registers", "vision-transformer", str(config.family), f"registers-{config.method}"]
    tags = own + [tag for tag in tags if tag not in own]
    card_data = ModelCardData(
        library_name="peft",
        base_model=hub_id,
        tags=tags,
        license=None,
    )
    name = base_model.rstrip("/").split("/")[-1] or type(base).__name__
    template = resources.files("register_adapter.model_cards").joinpath(CARD_TEMPLATE)
    with resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data,
            template_path=str(template_path),
            title=f"{name} with {config.num_register_tokens} register tokens",
            base_model=base_model or f"a {type(base).__name__} built from its config",
            base_model_url=f"https://huggingface.co/{hub_id}" if hub_id else None,
            load_path=base_model or "path/to/the/base/model",
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


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hub repository id (``org/name``) rather than a local path."""
    return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def _format_values(values: dict[str, Any] | None) -> dict[str, str]:
    return {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in (values or {}).items()}


def atomic_save(save_directory: str | os.PathLike, save: Any, **kwargs: Any) -> None:
    """Run ``save(tmp_dir, **kwargs)`` into a temporary folder inside ``save_directory``, then move each file into
    place with ``os.replace``, the config last: an interrupted save leaves the previous adapter files as they were.

    Raises:
        InvalidConfigError: ``safe_serialization=False`` (register adapters are only saved as safetensors).
    """
    if kwargs.get("safe_serialization", True) is False:
        raise InvalidConfigError(SAFETENSORS_ONLY)
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    _remove_killed_saves(save_directory)
    prefix = f"{STALE_SAVE_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=prefix) as tmp:
        save(tmp, **kwargs)
        for root, _, files in os.walk(tmp):
            relative = os.path.relpath(root, tmp)
            target_dir = os.path.normpath(os.path.join(save_directory, relative))
            os.makedirs(target_dir, exist_ok=True)
            # The config goes last so that a loader never sees a new config next to old weights.
            for name in sorted(files, key=lambda n: n == "adapter_config.json"):
                os.replace(os.path.join(root, name), os.path.join(target_dir, name))


def _remove_killed_saves(save_directory: str) -> None:
    """Remove the temporary folders of saves into ``save_directory`` whose process, on this host, no longer runs."""
    host = socket.gethostname()
    for name in os.listdir(save_directory):
        found = re.fullmatch(rf"{re.escape(STALE_SAVE_PREFIX)}(.+)-(\d+)-[^-]+", name)
        if found is None or found[1] != host or _process_runs(int(found[2])):
            continue
        shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    extra_files: Sequence[str | os.PathLike] = (),
) -> str:
    """Save the adapter with its model card into a temporary folder and upload it in one commit.

    Works with any ``PeftModel`` that holds a register adapter (also one loaded with ``PeftModel.from_pretrained``).
    ``extra_files`` (e.g. the base model's ``config.json`` with its labels, ``preprocessor_config.json``) are uploaded
    next to the adapter under their own names. Returns the commit URL.
    """
    adapter_name = adapter_name or model.active_adapter
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        _peft_method("save_pretrained")(model, tmp, selected_adapters=[adapter_name])
        folder = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        card = render_model_card(model, adapter_name, repo_id=repo_id, metrics=metrics, training=training, tags=tags)
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


# PushToHubMixin arguments that mean nothing for an adapter of a few kilobytes.
_IGNORED_PUSH_ARGUMENTS = ("use_temp_dir", "max_shard_size")


def _holds_registers(model: PeftModel) -> bool:
    return any(isinstance(config, RegisterConfig) for config in model.peft_config.values())


def _card_metadata(model: PeftModel) -> dict[str, Any]:
    return model.__dict__.get("card_metadata") or {}


def _peft_method(name: str) -> Callable[..., Any]:
    """``PeftModel``'s own method ``name``, under the wrapper :func:`install_peft_model_methods` put in its place."""
    method = getattr(PeftModel, name)
    return getattr(method, "__wrapped__", method)


def _wrap_save_pretrained(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
        if not _holds_registers(self):
            return original(self, save_directory, *args, **kwargs)
        bound = inspect.signature(original).bind(self, save_directory, *args, **kwargs)
        options = {k: v for k, v in bound.arguments.items() if k not in ("self", "save_directory", "kwargs")}
        options.update(bound.arguments.get("kwargs", {}))
        if not options.get("is_main_process", True):
            return original(self, save_directory, **options)  # writes nothing: the main process saves
        selected = options.get("selected_adapters") or [self.active_adapter]

        def save(folder: str, **settings: Any) -> None:
            original(self, folder, **settings)
            if selected != [self.active_adapter] and len(selected) == 1:  # PEFT's save described the active one
                card = render_model_card(self, selected[0], **_card_metadata(self))
                card.save(os.path.join(folder, "README.md"))

        atomic_save(save_directory, save, **options)

    return save_pretrained


def _wrap_create_or_update_model_card(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        if not _holds_registers(self):
            return original(self, output_dir)
        card = render_model_card(self, self.active_adapter, **_card_metadata(self))
        card.save(os.path.join(output_dir, "README.md"))

    return create_or_update_model_card


def _wrap_push_to_hub(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def push_to_hub_method(self: PeftModel, repo_id: str, **kwargs: Any) -> Any:
        if not _holds_registers(self):
            return original(self, repo_id, **kwargs)
        if kwargs.pop("safe_serialization", True) is False:
            raise InvalidConfigError(SAFETENSORS_ONLY)
        for name in _IGNORED_PUSH_ARGUMENTS:
            kwargs.pop(name, None)
        given = {k: v for k, v in kwargs.items() if v is not None}  # None means "the default", as in PushToHubMixin
        return push_to_hub(self, repo_id, **{**_card_metadata(self), **given})

    return push_to_hub_method


def install_peft_model_methods() -> None:
    """Make every ``PeftModel`` that holds register adapters, whether made by :func:`~register_adapter.add_registers`,
    ``get_peft_model``, ``PeftModel.from_pretrained`` or ``AutoPeftModel``, save atomically (:func:`atomic_save`),
    write the register model card (:func:`render_model_card`) and push with it (:func:`push_to_hub`). Models holding
    other adapter types keep PEFT's behaviour: the wrappers hand them PEFT's own method with the same arguments.
    Idempotent, also when this module is reloaded: PEFT's methods stay reachable as the wrappers' ``__wrapped__``.
    """
    wrappers = {
        "save_pretrained": _wrap_save_pretrained,
        "create_or_update_model_card": _wrap_create_or_update_model_card,
        "push_to_hub": _wrap_push_to_hub,
    }
    for name, wrap in wrappers.items():
        current = getattr(PeftModel, name)
        if getattr(current, "_register_adapter", False):
            continue
        wrapper = wrap(current)
        wrapper._register_adapter = True
        setattr(PeftModel, name, wrapper)

"""The one place where register_adapter reaches into PEFT's internals.

PEFT has no public way to add a method from outside its own code base, so a third-party method has to fill in what
PEFT's lookups read. Everything of that kind lives here:

* **The adapter type.** PEFT's own types are members of the closed ``PeftType`` enum, and
  ``peft.utils.peft_types.register_peft_method`` refuses any other name. :data:`REGISTERS` is a ``str`` (PEFT reads
  and writes ``peft_type`` as a string in ``adapter_config.json``) that also has the ``.value`` that transformers'
  ``PeftAdapterMixin.load_adapter`` / ``delete_adapter`` read.
* **The three lookup tables.** Every PEFT lookup goes through ``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``,
  ``PEFT_TYPE_TO_TUNER_MAPPING`` and ``PEFT_TYPE_TO_PREFIX_MAPPING`` keyed by ``config.peft_type``; :func:`register_method`
  adds :data:`REGISTERS` to them, so ``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``,
  ``AutoPeftModel`` and transformers' ``add_adapter`` / ``load_adapter`` work.
* **Three ``PeftModel`` methods.** ``save_pretrained``, ``create_or_update_model_card`` and ``push_to_hub`` are
  wrapped (:func:`install_peft_model_methods`) so that a ``PeftModel`` holding a register adapter saves atomically
  (:func:`register_adapter.saving.atomic_save`), writes the register model card of each saved adapter into its own
  folder and pushes with it in one commit (:mod:`register_adapter.hub`). A ``PeftModel`` holding only other adapter
  types gets PEFT's own method, with the same arguments: the wrappers hand it through untouched.
* **Loading adapter weights.** Register adapters belong to the vision tower, not to the class around it, but PEFT
  saves weights under their path in the whole model (``dinov2.embeddings...`` in ``Dinov2ForImageClassification``,
  ``embeddings...`` in ``Dinov2Model``). ``RegisterModel`` overrides PEFT's tuner hook
  ``_remap_adapter_state_dict_for_load`` (called by ``set_peft_model_state_dict``, which every PEFT load goes
  through) to move the saved weights to the tower of the model they are loaded into, then :func:`check_adapter_state`
  checks them against the adapter state PEFT created (``_get_tuner_state_dict_key_prefixes``, the
  ``adapter_state_dict_load_map`` of ``ModulesToSaveWrapper``): saved ``modules_to_save`` the model has no place for
  are dropped with a :class:`~register_adapter.errors.DroppedModulesWarning`, anything else that does not restore the
  adapter exactly raises :class:`~register_adapter.errors.AdapterMismatchError` instead of leaving weights freshly
  initialised.
* **transformers' ``load_adapter``.** transformers 5 loads adapters through its own weight-renaming loader, which
  inserts the adapter name only after keys starting with the method's prefix and so leaves LoRA weights inside a
  register adapter unloaded. ``PeftAdapterMixin.load_adapter`` is wrapped (:func:`install_transformers_load_adapter`)
  so that a register adapter is loaded with PEFT's documented low-level API instead (``inject_adapter_in_model`` +
  ``set_peft_model_state_dict``, hence the checks above); other adapters get transformers' own method. This also
  serves ``AutoModel*.from_pretrained(adapter_folder)`` and ``pipeline(model=adapter_folder)``, which call it.
* **One warning.** peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` in every
  ``PeftModel.__init__``; the ``FutureWarning`` it raises says nothing a user can act on and is filtered out.
* **The version guard.** :func:`check_versions` refuses combinations of transformers and peft known not to work
  together, with one :class:`~register_adapter.errors.IncompatibleVersionsError` that names the versions and the fix.

:func:`install` does all of it and is called by ``import register_adapter``. Importing PEFT takes seconds (it imports
torch and transformers), and ``import register_adapter`` must stay fast (``register-adapter --help`` needs no model
code), so when PEFT is not imported yet, :func:`install` only arms a post-import hook: the method is registered the
moment anything imports ``peft``. Either way, after ``import register_adapter`` PEFT knows the ``REGISTERS`` type.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from .errors import IncompatibleVersionsError


class RegisterPeftType(str):
    """The PEFT type of register adapters: a ``str`` with the ``.value`` of a ``PeftType`` member."""

    @property
    def value(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"<PeftType.{self}: {str(self)!r}>"


REGISTERS = RegisterPeftType("REGISTERS")
PREFIX = "register_tokens"
#: The prefix of every key that ``PeftModel.save_pretrained`` writes.
PEFT_PREFIX = "base_model.model."

# (transformers requirement, peft requirement, what breaks): pairs known not to work together. transformers 5.24
# refuses every peft below 0.22 in ``add_adapter`` / ``load_adapter`` (``transformers/utils/peft_utils.py``).
INCOMPATIBLE_VERSIONS = (("5.24", "0.22", "transformers' add_adapter / load_adapter refuse this peft"),)
TESTED_PEFT = "0.21.2"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(transformers_version: str | None = None, peft_version: str | None = None) -> None:
    """Refuse installed versions of transformers and peft that are known not to work together.

    Reads package metadata only (nothing is imported). The arguments override the installed versions, for tests.

    Raises:
        IncompatibleVersionsError: transformers >= 5.24 with peft < 0.22; the message names both versions and the
            fix.
    """
    from packaging.version import Version

    found_transformers = transformers_version or _version("transformers")
    found_peft = peft_version or _version("peft")
    if found_transformers is None or found_peft is None:
        return
    for transformers_from, peft_from, problem in INCOMPATIBLE_VERSIONS:
        if Version(found_transformers) >= Version(transformers_from) and Version(found_peft) < Version(peft_from):
            raise IncompatibleVersionsError(
                f"transformers {found_transformers} and peft {found_peft} do not work together: {problem} (it needs "
                f"peft >= {peft_from}). Install the tested set: pip install 'transformers<{transformers_from}' "
                f"peft=={TESTED_PEFT} (or `make install`, which uses constraints.txt), or a peft >= {peft_from} once "
                "register_adapter supports it."
            )


def register_method() -> None:
    """Add :data:`REGISTERS` to PEFT's three lookup tables, wrap the ``PeftModel`` methods and transformers'
    ``load_adapter``. Idempotent."""
    from peft import mapping

    from .tuner.config import RegisterConfig
    from .tuner.model import RegisterModel

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[REGISTERS] = RegisterConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[REGISTERS] = RegisterModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[REGISTERS] = PREFIX
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    install_peft_model_methods()
    install_transformers_load_adapter()


def _peft_imported() -> bool:
    module = sys.modules.get("peft")
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register_method` right after ``peft`` (the package) has been imported, then removes itself.

    It finds ``peft`` with the finders after it in ``sys.meta_path``, as the import would have without it: ``peft`` may
    come from a finder of its own (an editable install, a bundled application) rather than from ``sys.path``.
    """

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft" or self._searching:
            return None
        self._searching = True  # a finder that itself looks for peft must not come back here
        try:
            spec = _find_with_other_finders(fullname, path, target)
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _remove_hook()
            register_method()

        spec.loader.exec_module = exec_then_register
        return spec


def _find_with_other_finders(fullname: str, path: Any, target: Any) -> importlib.machinery.ModuleSpec | None:
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if isinstance(finder, _AfterPeftImport) or find_spec is None:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AfterPeftImport)]


def install() -> None:
    """Check the versions and make PEFT know register adapters: now if ``peft`` is imported, else as soon as it is.

    Called by ``import register_adapter``; idempotent.
    """
    check_versions()
    if _peft_imported():
        register_method()
    elif not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())


# -- PeftModel methods -------------------------------------------------------------------------------------------------

# PushToHubMixin arguments that mean nothing for an adapter of a few kilobytes.
_IGNORED_PUSH_ARGUMENTS = ("use_temp_dir", "max_shard_size")


def holds_registers(model: Any) -> bool:
    """Whether the ``PeftModel`` holds at least one register adapter."""
    from .tuner.config import RegisterConfig

    return any(isinstance(config, RegisterConfig) for config in model.peft_config.values())


def card_metadata(model: Any) -> dict[str, Any]:
    """What ``model.card_metadata`` (set by the user or a trainer) adds to the model card."""
    return model.__dict__.get("card_metadata") or {}


def peft_method(name: str) -> Callable[..., Any]:
    """``PeftModel``'s own method ``name``, under the wrapper :func:`install_peft_model_methods` put in its place."""
    from peft import PeftModel

    method = getattr(PeftModel, name)
    return getattr(method, "__wrapped__", method)


def card_adapter(model: Any) -> str:
    """The adapter whose card goes into the root of a save: ``"default"`` (PEFT saves it there), else the active one."""
    return "default" if "default" in model.peft_config else model.active_adapter


def _wrap_save_pretrained(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save_pretrained(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> None:
        if not holds_registers(self):
            return original(self, save_directory, *args, **kwargs)
        from .architectures import find_vision_tower
        from .hub import render_model_card
        from .saving import atomic_save

        bound = inspect.signature(original).bind(self, save_directory, *args, **kwargs)
        options = {k: v for k, v in bound.arguments.items() if k not in ("self", "save_directory", "kwargs")}
        options.update(bound.arguments.get("kwargs", {}))
        if not options.get("is_main_process", True):
            return original(self, save_directory, **options)  # writes nothing: the main process saves
        selected = list(options.get("selected_adapters") or self.peft_config)
        tower_path = find_vision_tower(self).path
        for name in selected:  # the weights are saved under this model's tower
            self.peft_config[name].tower_path = tower_path

        def save(folder: str, **settings: Any) -> None:
            original(self, folder, **settings)  # the root card: create_or_update_model_card, for card_adapter(self)
            cards = [(name, os.path.join(folder, name)) for name in selected if name != "default"]
            if "default" not in selected:  # the root holds no adapter: its card describes one that was saved
                root = self.active_adapter if self.active_adapter in selected else selected[0]
                if root != card_adapter(self):
                    cards.append((root, folder))
            for name, where in cards:
                render_model_card(self, name, **card_metadata(self)).save(os.path.join(where, "README.md"))

        atomic_save(save_directory, save, **options)

    return save_pretrained


def _wrap_create_or_update_model_card(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        if not holds_registers(self):
            return original(self, output_dir)
        from .hub import render_model_card

        card = render_model_card(self, card_adapter(self), **card_metadata(self))
        card.save(os.path.join(output_dir, "README.md"))

    return create_or_update_model_card


def _wrap_push_to_hub(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def push_to_hub_method(self: Any, repo_id: str, **kwargs: Any) -> Any:
        if not holds_registers(self):
            return original(self, repo_id, **kwargs)
        from .errors import InvalidConfigError
        from .hub import push_to_hub
        from .saving import SAFETENSORS_ONLY

        if kwargs.pop("safe_serialization", True) is False:
            raise InvalidConfigError(SAFETENSORS_ONLY)
        for name in _IGNORED_PUSH_ARGUMENTS:
            kwargs.pop(name, None)
        given = {k: v for k, v in kwargs.items() if v is not None}  # None means "the default", as in PushToHubMixin
        return push_to_hub(self, repo_id, **{**card_metadata(self), **given})

    return push_to_hub_method


def install_peft_model_methods() -> None:
    """Make every ``PeftModel`` that holds register adapters, whether made by :func:`~register_adapter.add_registers`,
    ``get_peft_model``, ``PeftModel.from_pretrained`` or ``AutoPeftModel``, save atomically, write the register model
    card and push with it. Models holding other adapter types keep PEFT's behaviour: the wrappers hand them PEFT's own
    method with the same arguments. Idempotent, also when this module is reloaded: PEFT's methods stay reachable as
    the wrappers' ``__wrapped__``.
    """
    from peft import PeftModel

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


# -- loading adapter weights -------------------------------------------------------------------------------------------

MAX_LISTED_KEYS = 5


def adapter_state_keys(model: Any, adapter_name: str) -> set[str]:
    """The keys of ``model.state_dict()`` that hold adapter ``adapter_name``: the weights of its tuner layers
    (registers, LoRA, ...) and of its copies of ``modules_to_save``."""
    from peft.tuners.tuners_utils import _get_tuner_state_dict_key_prefixes, _is_key_under_prefixes
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    keys = {key for key in model.state_dict() if _is_key_under_prefixes(key, prefixes)}
    for path, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            keys.update(f"{path}.{key}" for key in module.adapter_state_dict_load_map(adapter_name).values())
    return keys


def _listing(keys: list[str]) -> str:
    shown = ", ".join(key.removeprefix(PEFT_PREFIX) for key in keys[:MAX_LISTED_KEYS])
    return shown + (f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


def _saved_module(key: str, names: list[str]) -> str | None:
    """The module of ``modules_to_save`` (``names``, matched as PEFT matches them) that the saved ``key`` is a weight
    of, or ``None``."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")[:-1]
    for end in range(len(parts), 0, -1):
        path = ".".join(parts[:end])
        if any(path.endswith(name) for name in names):
            return path
    return None


def check_adapter_state(model: Any, config: Any, adapter_name: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check that ``state_dict`` (keys as PEFT is about to load them into ``model``) restores adapter
    ``adapter_name`` exactly, and drop the saved ``modules_to_save`` that ``model`` has no place for.

    Returns:
        ``state_dict`` without the dropped modules' weights.

    Warns:
        DroppedModulesWarning: saved ``modules_to_save`` (e.g. a classification head) have no place in ``model``.

    Raises:
        AdapterMismatchError: a saved weight has no place in ``model`` or another shape there, or an adapter weight of
            ``model`` has none saved (it would stay freshly initialised).
    """
    from .architectures import find_vision_tower
    from .errors import AdapterMismatchError, DroppedModulesWarning

    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = adapter_state_keys(model, adapter_name)
    prefixed = any(key.startswith(PEFT_PREFIX) for key in shapes)  # a PeftModel; not a model with injected layers
    placed, unplaced, mismatched = set(), [], []
    for key, value in state_dict.items():
        target = key if prefixed else key.removeprefix(PEFT_PREFIX)
        if target not in expected:
            unplaced.append(key)
            continue
        placed.add(target)
        if tuple(value.shape) != shapes[target]:
            mismatched.append(
                f"{target.removeprefix(PEFT_PREFIX)} {list(value.shape)} in the adapter, "
                f"{list(shapes[target])} in the model"
            )
    # modules_to_save, with those that RegisterModel did not copy because the model has no place for them
    names = [*(config.modules_to_save or []), *getattr(config, "_dropped_modules", [])]
    dropped = {key: _saved_module(key, names) for key in unplaced}
    others = sorted(key for key, module in dropped.items() if module is None)
    missing = sorted(expected - placed)
    model_name = type(find_vision_tower(model).root).__name__
    saved_from = (config.auto_mapping or {}).get("base_model_class") or "the model it was saved from"
    if mismatched:
        raise AdapterMismatchError(
            f"The adapter's weights do not fit {model_name}: {'; '.join(mismatched)}. Load it into a model of the "
            f"size it was made for ({saved_from}); for a classification head, load the base model with its number of "
            "labels."
        )
    if others:
        raise AdapterMismatchError(
            f"{len(others)} weights of the adapter have no place in {model_name}: {_listing(others)}. Load it into a "
            f"model of the architecture it was made for ({saved_from}) or another class of that family."
        )
    if missing:
        raise AdapterMismatchError(
            f"The adapter files hold no weights for {len(missing)} parameters that adapter {adapter_name!r} has in "
            f"{model_name}: {_listing(missing)}; they would stay freshly initialised. Load it into a model of the "
            f"architecture it was made for ({saved_from})."
        )
    modules = sorted({module for module in dropped.values() if module is not None})
    if modules:
        one = len(modules) == 1
        warnings.warn(
            f"The adapter's {', '.join(modules)} (modules_to_save) {'has' if one else 'have'} no place in "
            f"{model_name} and {'is' if one else 'are'} not loaded; the rest of the adapter is. To use "
            f"{'it' if one else 'them'}, load the adapter into a model that has {'it' if one else 'them'}, such as "
            f"{saved_from}.",
            DroppedModulesWarning,
            stacklevel=2,
        )
    return {key: value for key, value in state_dict.items() if key not in dropped}


def _download_kwargs(arguments: dict[str, Any]) -> dict[str, Any]:
    """The Hub download arguments that transformers' ``load_adapter`` would use, from its bound ``arguments``."""
    from huggingface_hub import hf_hub_download

    load_config = arguments.get("load_config")
    found = dict(getattr(load_config, "download_kwargs", None) or {})
    found.update(arguments.get("kwargs", {}).get("download_kwargs") or {})
    found.update(arguments.get("adapter_kwargs") or {})
    if arguments.get("local_files_only"):
        found["local_files_only"] = True
    accepted = inspect.signature(hf_hub_download).parameters
    return {key: value for key, value in found.items() if key in accepted and value is not None}


def _saved_register_config(model_id: str, download: dict[str, Any]) -> Any:
    """The register config saved at ``model_id``; ``None`` when it holds another kind of adapter or none that can be
    read (transformers' own ``load_adapter`` then reports why)."""
    from peft import PeftConfig

    from .tuner.config import RegisterConfig

    try:
        found = PeftConfig.from_pretrained(model_id, **download)
    except Exception:  # not an adapter, not reachable: transformers' own method raises its usual error
        return None
    if not isinstance(found, RegisterConfig):
        return None
    return RegisterConfig.from_pretrained(model_id, **download)  # checks the weights next to it


def load_register_adapter(
    model: Any,
    config: Any,
    *,
    model_id: str | None = None,
    adapter_name: str | None = None,
    state_dict: dict[str, Any] | None = None,
    is_trainable: bool = False,
    low_cpu_mem_usage: bool = False,
    download: dict[str, Any] | None = None,
) -> Any:
    """transformers' ``model.load_adapter`` for a register adapter, with PEFT's low-level API: inject the adapter into
    ``model`` and load its weights with ``set_peft_model_state_dict``. On an error the half-loaded adapter is
    removed again."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.save_and_load import load_peft_weights
    from transformers.utils.loading_report import LoadStateDictInfo

    adapter_name = adapter_name or "default"
    if getattr(model, "_hf_peft_config_loaded", False) and adapter_name in model.peft_config:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    if state_dict is None:
        device = next(model.parameters()).device
        state_dict = load_peft_weights(model_id, device=str(device), **(download or {}))
    # Keys as get_peft_model_state_dict gives them for a model with injected layers: without PeftModel's prefix.
    state_dict = {key.removeprefix(PEFT_PREFIX): value for key, value in state_dict.items()}
    config.inference_mode = not is_trainable
    inject_adapter_in_model(config, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    model._hf_peft_config_loaded = True
    try:
        set_peft_model_state_dict(model, state_dict, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    if config.inference_mode:
        model.eval()
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.requires_grad_(False)
    return LoadStateDictInfo(
        missing_keys=set(),
        unexpected_keys=set(),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )


def _wrap_transformers_load_adapter(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        from .tuner.config import RegisterConfig

        bound = inspect.signature(original).bind(self, *args, **kwargs)
        arguments = bound.arguments
        load_config = arguments.get("load_config")
        model_id = arguments.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
        download = _download_kwargs(arguments)
        config = arguments.get("peft_config")
        if config is None and model_id is not None:
            config = _saved_register_config(model_id, download)
        if not isinstance(config, RegisterConfig) or arguments.get("hotswap") is True:
            return original(self, *args, **kwargs)
        return load_register_adapter(
            self,
            config,
            model_id=model_id,
            adapter_name=arguments.get("adapter_name"),
            state_dict=arguments.get("adapter_state_dict"),
            is_trainable=arguments.get("is_trainable", False),
            low_cpu_mem_usage=arguments.get("low_cpu_mem_usage", False),
            download=download,
        )

    return load_adapter


def install_transformers_load_adapter() -> None:
    """Make transformers' ``model.load_adapter`` (and so ``from_pretrained`` and ``pipeline`` on an adapter folder)
    load register adapters with PEFT's loader, which restores their LoRA weights and moves them to the model's tower.
    Idempotent."""
    from transformers.integrations.peft import PeftAdapterMixin

    current = PeftAdapterMixin.load_adapter
    if getattr(current, "_register_adapter", False):
        return
    wrapper = _wrap_transformers_load_adapter(current)
    wrapper._register_adapter = True
    PeftAdapterMixin.load_adapter = wrapper

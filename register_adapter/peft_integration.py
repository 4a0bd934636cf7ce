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
  (:func:`register_adapter.saving.atomic_save`), writes the register model card and pushes with it in one commit
  (:mod:`register_adapter.hub`). A ``PeftModel`` holding only other adapter types gets PEFT's own method, with the same
  arguments: the wrappers hand it through untouched.
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
    """Add :data:`REGISTERS` to PEFT's three lookup tables and wrap the ``PeftModel`` methods. Idempotent."""
    from peft import mapping

    from .tuner.config import RegisterConfig
    from .tuner.model import RegisterModel

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[REGISTERS] = RegisterConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[REGISTERS] = RegisterModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[REGISTERS] = PREFIX
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    install_peft_model_methods()


def _peft_imported() -> bool:
    module = sys.modules.get("peft")
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register_method` right after ``peft`` (the package) has been imported, then removes itself."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _remove_hook()
            register_method()

        spec.loader.exec_module = exec_then_register
        return spec


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


def _wrap_save_pretrained(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save_pretrained(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> None:
        if not holds_registers(self):
            return original(self, save_directory, *args, **kwargs)
        from .hub import render_model_card
        from .saving import atomic_save

        bound = inspect.signature(original).bind(self, save_directory, *args, **kwargs)
        options = {k: v for k, v in bound.arguments.items() if k not in ("self", "save_directory", "kwargs")}
        options.update(bound.arguments.get("kwargs", {}))
        if not options.get("is_main_process", True):
            return original(self, save_directory, **options)  # writes nothing: the main process saves
        selected = options.get("selected_adapters") or [self.active_adapter]

        def save(folder: str, **settings: Any) -> None:
            original(self, folder, **settings)
            if selected != [self.active_adapter] and len(selected) == 1:  # PEFT's save described the active one
                card = render_model_card(self, selected[0], **card_metadata(self))
                card.save(os.path.join(folder, "README.md"))

        atomic_save(save_directory, save, **options)

    return save_pretrained


def _wrap_create_or_update_model_card(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        if not holds_registers(self):
            return original(self, output_dir)
        from .hub import render_model_card

        card = render_model_card(self, self.active_adapter, **card_metadata(self))
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

"""The error hierarchy of register_adapter.

Every error raised on bad input derives from :class:`RegisterAdapterError` and from the builtin that fits it
(``ValueError``, ``TypeError``, ``FileNotFoundError``), so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class RegisterAdapterError(Exception):
    """Base class of every error raised by register_adapter."""


class UnsupportedModelError(RegisterAdapterError, ValueError):
    """The model is not a vision transformer family that register_adapter knows how to adapt."""


class InvalidConfigError(RegisterAdapterError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class AdapterMismatchError(RegisterAdapterError, ValueError):
    """A saved adapter does not fit the model it is loaded into (hidden size, family, register count)."""


class AdapterFilesError(RegisterAdapterError, FileNotFoundError):
    """Adapter files are missing, incomplete or corrupted."""


class MergeNotSupportedError(RegisterAdapterError, NotImplementedError):
    """Register tokens are extra sequence positions: they cannot be merged into the base weights."""


class DataError(RegisterAdapterError, ValueError):
    """Input images or datasets are missing, empty, unreadable or lack a required column."""


class IncompatibleVersionsError(RegisterAdapterError, ImportError):
    """The installed transformers and peft are known not to work together."""


class DroppedModulesWarning(UserWarning):
    """A module saved with an adapter (``modules_to_save``, e.g. a classification head) has no place in the model the
    adapter is loaded into, and is left out. To refuse such a load instead, turn the warning into an error:
    ``warnings.simplefilter("error", DroppedModulesWarning)``."""

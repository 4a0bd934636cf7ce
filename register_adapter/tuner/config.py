"""Configuration of a register adapter."""

from __future__ import annotations

import contextlib
import numbers
import os
from collections import Counter
from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..errors import InvalidConfigError
from ..peft_integration import PEFT_PREFIX, REGISTERS

INIT_METHODS = ("normal", "zeros", "scaled_randn")
#: The weights a register adapter can unlock (see :mod:`register_adapter.tuner.unlocked`), in config order.
UNLOCKABLE_WEIGHTS = ("position_embeddings", "patch_embedding", "last_block")
#: How registers were obtained, and how model cards describe it.
METHODS = {
    "trained": "trained registers ([arXiv 2309.16588](https://arxiv.org/abs/2309.16588))",
    "distilled": "post-hoc self-distilled registers, PH-Reg ([arXiv 2505.21501](https://arxiv.org/abs/2505.21501))",
    "test-time": "training-free test-time registers ([arXiv 2506.08010](https://arxiv.org/abs/2506.08010))",
}
#: How test-time registers take the activation of their register neurons (see :mod:`register_adapter.tuner.neurons`).
NEURON_MODE_DESCRIPTIONS = {
    "neuron_max": "each register takes each of its neurons' maximum over the image's tokens (the paper's Algorithm 2)",
    "layer_max": "each register takes, for every neuron of a block, the one value of largest magnitude over the "
    "block's register neurons and the image's tokens (the public code)",
}
NEURON_MODES = tuple(NEURON_MODE_DESCRIPTIONS)


@dataclass
class RegisterConfig(PeftConfig):
    """Configuration of a register adapter (Darcet et al., "Vision Transformers Need Registers",
    https://arxiv.org/abs/2309.16588).

    Register tokens are inserted after the class token (and any distillation or native register tokens), before the
    patch tokens, and get no position embedding. By default they are removed again before ``last_hidden_state``, the
    pooler and every head, so the model's outputs keep their shapes.

    Args:
        num_register_tokens: Number of register tokens to add.
        init: How to initialise them: ``"normal"`` (std 1e-6, as DINOv2 and timm), ``"zeros"`` (as transformers'
            ``Dinov2WithRegisters``) or ``"scaled_randn"`` (``randn / sqrt(hidden_size)``, as PH-Reg).
        strip_registers: Remove registers from ``last_hidden_state`` and everything computed from it. Whatever its
            value, registers never enter what is laid out on the patch grid (Backbone feature maps, the masked-image
            decoders of ViT, DeiT and ViTMAE).
        method: How the registers were obtained (``"trained"``, ``"distilled"``, ``"test-time"``); for model cards.
        family: The model family; filled in when the adapter is created and checked when it is loaded.
        hidden_size: Width of the registers; filled in when the adapter is created and checked when it is loaded.
        native_register_tokens: Registers the architecture has itself (``Dinov2WithRegisters``, DINOv3), which the
            added ones follow; filled in when the adapter is created and checked when it is loaded.
        tower_path: Dotted path of the vision tower in the model the adapter's weights were saved from (``""`` when
            that model is the tower itself, ``"dinov2"`` in ``Dinov2ForImageClassification``); filled in when the
            adapter is created. Loading moves every weight saved under it to the tower of the model it is loaded into,
            so an adapter made on one class of a family loads into any other class with the same tower.
        labels: Class names of the classification head trained and saved with the adapter (``modules_to_save``), in
            the order of its outputs. Creating or loading the adapter sizes every ``nn.Linear`` in ``modules_to_save``
            for them and sets the model config's ``id2label``/``label2id``; ``register-adapter train`` fills it in.
        modules_to_save: Modules besides the registers that are trained and saved, e.g. ``["classifier"]``.
        lora_r: Rank of LoRA on the attention projections of the vision tower's blocks, trained and saved in the same
            adapter as the registers; ``0`` (default) for none.
        lora_alpha: LoRA scaling numerator; the low-rank update is scaled by ``lora_alpha / lora_r``.
        lora_dropout: Dropout on the input of the LoRA branch.
        lora_target_modules: Names of the ``nn.Linear`` layers inside each block that get LoRA (default
            ``["q_proj", "v_proj"]``). Never applied outside the vision tower (e.g. CLIP's text tower).
        register_neurons: Test-time registers (Jiang et al., https://arxiv.org/abs/2506.08010): the MLP hidden units,
            as ``(block, unit)`` pairs (``block`` indexes the vision tower's blocks from 0, ``unit`` the input of the
            block's MLP output projection), whose activation is moved onto the registers in every forward pass.
            Best first: with several registers, neuron ``i`` goes to register ``i % num_register_tokens``. Needs
            ``method="test-time"``; see :func:`register_adapter.add_test_time_registers`.
        neuron_mode: ``"neuron_max"`` (default, the paper's Algorithm 2): each register neuron's activation on the
            register is its maximum over the image's tokens. ``"layer_max"`` (the paper's public code): every register
            neuron of a block gets the one value of largest magnitude over the block's register neurons and tokens.
        keep_cls: Keep the register neurons' activation on CLS (and DeiT's distillation token), as the public code
            does; by default (``False``, the paper) every token but the registers gets 0.
        neuron_source: How the register neurons were found, in words; shown in the model card.
        unlocked_weights: Weights of the vision tower that the adapter trains a copy of, as PH-Reg does (see
            :mod:`register_adapter.tuner.unlocked`): any of ``"position_embeddings"``, ``"patch_embedding"``,
            ``"last_block"``. The base model's own weights never change.

    Example:

    >>> from register_adapter import RegisterConfig
    >>> RegisterConfig(num_register_tokens=4).peft_type
    <PeftType.REGISTERS: 'REGISTERS'>
    """

    num_register_tokens: int = field(default=4, metadata={"help": "Number of register tokens to add."})
    init: str = field(
        default="normal",
        metadata={"help": f"Initialisation of the register tokens, one of {', '.join(INIT_METHODS)}."},
    )
    strip_registers: bool = field(
        default=True,
        metadata={"help": "Remove the registers from last_hidden_state and everything computed from it."},
    )
    method: str = field(
        default="trained",
        metadata={"help": "How the registers were obtained (trained, distilled, test-time); shown in the model card."},
    )
    family: str | None = field(default=None, metadata={"help": "Model family; filled in when the adapter is created."})
    hidden_size: int | None = field(
        default=None, metadata={"help": "Register width; filled in when the adapter is created."}
    )
    native_register_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Registers the architecture has itself (before ours); filled in when the adapter is created."
        },
    )
    tower_path: str | None = field(
        default=None,
        metadata={"help": "Path of the vision tower in the model the adapter was saved from; filled in when created."},
    )
    labels: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names of the classification head saved with the adapter, in the order of its outputs."
        },
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "Path of the embeddings module to wrap; found automatically when left empty."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the registers to train and save, e.g. a new classifier head."},
    )
    lora_r: int = field(
        default=0, metadata={"help": "Rank of LoRA on the vision tower's attention projections; 0 for no LoRA."}
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Names of the linear layers in each block that get LoRA."},
    )
    register_neurons: list[tuple[int, int]] | None = field(
        default=None,
        metadata={
            "help": "Test-time register neurons as (block, unit) pairs, best first; their activation is moved onto "
            "the registers."
        },
    )
    neuron_mode: str = field(
        default="neuron_max",
        metadata={"help": f"How registers take the register neurons' activation, one of {', '.join(NEURON_MODES)}."},
    )
    keep_cls: bool = field(
        default=False,
        metadata={"help": "Keep the register neurons' activation on CLS (public code) instead of zeroing it (paper)."},
    )
    neuron_source: str | None = field(
        default=None, metadata={"help": "How the register neurons were found, in words; shown in the model card."}
    )
    unlocked_weights: list[str] | None = field(
        default=None,
        metadata={
            "help": "Weights of the vision tower the adapter trains a copy of: any of "
            f"{', '.join(UNLOCKABLE_WEIGHTS)}."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = REGISTERS
        self.num_register_tokens = _whole_number(
            "num_register_tokens", self.num_register_tokens, 1, "Papers use 4 (trained) or 16 (PH-Reg)."
        )
        self.lora_r = _whole_number("lora_r", self.lora_r, 0, "0 disables LoRA.")
        if self.init not in INIT_METHODS:
            raise InvalidConfigError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}.")
        if self.method not in METHODS:
            raise InvalidConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if not isinstance(self.strip_registers, bool):
            raise InvalidConfigError(f"strip_registers must be True or False, got {self.strip_registers!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.labels is not None:
            self.labels = _class_names(self.labels)
        self._check_test_time()
        self._check_unlocked_weights()

    def _check_test_time(self) -> None:
        """Validate the test-time register fields; neuron lists read from JSON become lists of tuples."""
        if self.neuron_mode not in NEURON_MODES:
            raise InvalidConfigError(
                f"neuron_mode must be one of {', '.join(NEURON_MODES)}, got {self.neuron_mode!r}."
            )
        if not isinstance(self.keep_cls, bool):
            raise InvalidConfigError(f"keep_cls must be True or False, got {self.keep_cls!r}.")
        if self.register_neurons is None:
            return
        self.register_neurons = [_neuron(pair) for pair in _neuron_list(self.register_neurons)]
        repeated = sorted(pair for pair, count in Counter(self.register_neurons).items() if count > 1)
        if repeated:
            raise InvalidConfigError(f"register_neurons lists {', '.join(map(str, repeated))} more than once.")
        if self.method != "test-time":
            raise InvalidConfigError(
                f"register_neurons belong to test-time registers: set method='test-time' (got {self.method!r}), or "
                "use register_adapter.add_test_time_registers, which does."
            )

    def _check_unlocked_weights(self) -> None:
        """Keep ``unlocked_weights`` as a list in the order of ``UNLOCKABLE_WEIGHTS`` (``None`` when empty)."""
        unlocked = [self.unlocked_weights] if isinstance(self.unlocked_weights, str) else self.unlocked_weights or []
        unknown = [name for name in unlocked if name not in UNLOCKABLE_WEIGHTS]
        if unknown:
            raise InvalidConfigError(
                f"unlocked_weights must hold names from {', '.join(UNLOCKABLE_WEIGHTS)}, got {unknown!r}."
            )
        if self.lora_r and "last_block" in unlocked:
            raise InvalidConfigError(
                f"lora_r={self.lora_r} with 'last_block' in unlocked_weights: the last block is trained whole, so LoRA "
                "on it has nothing to add. Use one of the two (lora_r=0, or leave last_block out)."
            )
        self.unlocked_weights = [name for name in UNLOCKABLE_WEIGHTS if name in unlocked] or None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config and check that the adapter weights next to it are present and readable.

        A save into the folder that was killed between its moves is rolled back first (see
        :func:`register_adapter.saving.atomic_save`), so the previous adapter loads.

        Raises:
            AdapterFilesError: ``adapter_model.safetensors`` is missing, is not a readable safetensors file, or holds
                registers of another shape than the config says (files from two different saves).
        """
        from ..saving import check_adapter_weights, recover_interrupted_saves

        folder = os.path.normpath(os.path.join(pretrained_model_name_or_path, subfolder or ""))
        if os.path.isdir(folder):
            # A save killed between its moves is rolled back first. The journal is in the folder saved into, which
            # holds adapters other than "default" in sub-folders.
            for where in {folder, os.path.dirname(folder) or "."}:
                with contextlib.suppress(OSError):  # a read-only copy: the weights check below reports a mix-up
                    recover_interrupted_saves(where)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        shapes = check_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, config=config, **kwargs)
        # Which modules_to_save the files hold weights for: loading wraps only those (see RegisterModel).
        config._saved_keys = frozenset(key.removeprefix(PEFT_PREFIX) for key in shapes)
        return config


def _neuron_list(value: object) -> list[object]:
    items = None if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    if not items:
        raise InvalidConfigError(
            f"register_neurons must be a non-empty list of (block, unit) pairs, or None for no test-time registers; "
            f"got {value!r}."
        )
    return items


def _neuron(pair: object) -> tuple[int, int]:
    items = list(pair) if isinstance(pair, (list, tuple)) else None
    if (
        items is None
        or len(items) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 for v in items)
    ):
        raise InvalidConfigError(
            f"Each register neuron must be a (block, unit) pair of whole numbers >= 0 (0-based block of the vision "
            f"tower, hidden unit of its MLP); got {pair!r}."
        )
    return int(items[0]), int(items[1])


def _whole_number(name: str, value: object, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InvalidConfigError(f"{name} must be {kind}, got {value!r}. {hint}")
    return int(value)


def _class_names(labels: object) -> list[str]:
    names = list(labels) if isinstance(labels, (list, tuple)) else None
    if not names or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise InvalidConfigError(f"labels must be a non-empty list of distinct class names (strings), got {labels!r}.")
    return names

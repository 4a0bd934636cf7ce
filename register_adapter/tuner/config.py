"""Configuration of a register adapter."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..errors import InvalidConfigError
from ..peft_integration import REGISTERS

INIT_METHODS = ("normal", "zeros", "scaled_randn")
#: The weights a register adapter can unlock (see :mod:`register_adapter.tuner.unlocked`), in config order.
UNLOCKABLE_WEIGHTS = ("position_embeddings", "patch_embedding", "last_block")
#: How registers were obtained, and how model cards describe it.
METHODS = {
    "trained": "trained registers ([arXiv 2309.16588](https://arxiv.org/abs/2309.16588))",
    "distilled": "post-hoc self-distilled registers, PH-Reg ([arXiv 2505.21501](https://arxiv.org/abs/2505.21501))",
    "test-time": "training-free test-time registers ([arXiv 2506.08010](https://arxiv.org/abs/2506.08010))",
}


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
        modules_to_save: Modules besides the registers that are trained and saved, e.g. ``["classifier"]``.
        lora_r: Rank of LoRA on the attention projections of the vision tower's blocks, trained and saved in the same
            adapter as the registers; ``0`` (default) for none.
        lora_alpha: LoRA scaling numerator; the low-rank update is scaled by ``lora_alpha / lora_r``.
        lora_dropout: Dropout on the input of the LoRA branch.
        lora_target_modules: Names of the ``nn.Linear`` layers inside each block that get LoRA (default
            ``["q_proj", "v_proj"]``). Never applied outside the vision tower (e.g. CLIP's text tower).
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
        self._check_unlocked_weights()

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

        Raises:
            AdapterFilesError: ``adapter_model.safetensors`` is missing, is not a readable safetensors file, or holds
                registers of another shape than the config says (files from two different saves).
        """
        from ..saving import check_adapter_weights

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        check_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, config=config, **kwargs)
        return config


def _whole_number(name: str, value: object, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InvalidConfigError(f"{name} must be {kind}, got {value!r}. {hint}")
    return int(value)

"""Configuration of a register adapter."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from peft.config import PeftConfig

from .errors import AdapterFilesError, InvalidConfigError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"

INIT_METHODS = ("normal", "zeros", "scaled_randn")
METHODS = ("trained", "distilled", "test-time")


class RegisterPeftType(str):
    """The PEFT type of register adapters.

    PEFT's own types are members of a closed ``enum``; a third-party type only has to be a ``str`` that also has the
    ``.value`` that transformers' ``PeftAdapterMixin`` reads.
    """

    @property
    def value(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"<PeftType.{self}: {str(self)!r}>"


REGISTERS = RegisterPeftType("REGISTERS")


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config and check that the adapter weights next to it are present and readable.

        Raises:
            AdapterFilesError: ``adapter_model.safetensors`` is missing, is not a readable safetensors file, or holds
                registers of another shape than the config says (files from two different saves).
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        check_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, config=config, **kwargs)
        return config


def _whole_number(name: str, value: object, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InvalidConfigError(f"{name} must be {kind}, got {value!r}. {hint}")
    return int(value)


def check_adapter_weights(
    path_or_repo_id: str, subfolder: str | None = None, config: RegisterConfig | None = None, **hub_kwargs
) -> str:
    """Return the local path of ``adapter_model.safetensors`` after checking that its header can be read and, given
    the ``config`` saved with it, that its registers have the shape that config describes."""
    import os

    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    folder = os.path.join(path_or_repo_id, subfolder) if subfolder else path_or_repo_id
    if os.path.isdir(folder):
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            found = sorted(os.listdir(folder))
            advice = "Save the adapter again with model.save_pretrained(folder)."
            if PICKLED_WEIGHTS_NAME in found:
                advice = (
                    f"{PICKLED_WEIGHTS_NAME} is a pickle, which register_adapter does not load (unpickling can run "
                    "code). Save the adapter again with model.save_pretrained(folder), which writes safetensors."
                )
            raise AdapterFilesError(f"{weights} is missing: the adapter folder holds only {found}. {advice}")
    else:
        allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
        try:
            weights = hf_hub_download(path_or_repo_id, WEIGHTS_NAME, subfolder=subfolder, **allowed)
        except Exception as error:
            raise AdapterFilesError(
                f"Could not get {WEIGHTS_NAME} of {path_or_repo_id!r}: {error}. Check the repository id and, offline, "
                "that the adapter is in the Hugging Face cache."
            ) from error
    try:
        with safe_open(weights, framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except Exception as error:
        raise AdapterFilesError(
            f"{weights} is not a readable safetensors file ({error}). It is corrupted or incomplete: "
            "download or save the adapter again."
        ) from error
    if config is not None and config.hidden_size is not None:
        expected = (1, config.num_register_tokens, config.hidden_size)
        for key, shape in shapes.items():
            if key.endswith("register_tokens") and shape != expected:
                raise AdapterFilesError(
                    f"{weights} holds registers of shape {list(shape)} ({key}), but its adapter_config.json says "
                    f"{config.num_register_tokens} registers of width {config.hidden_size}: the two files come from "
                    "different saves. Save the adapter again."
                )
    return weights

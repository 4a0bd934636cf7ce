"""Settings of post-hoc self-distilled registers (PH-Reg, Chen et al., https://arxiv.org/abs/2505.21501)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from ...architectures import VisionTower
from ...errors import InvalidConfigError
from ...tuner.config import INIT_METHODS

#: What fills the pixels a shifted view takes from outside the image, in the normalised units of the processor.
FILLS = ("white", "black", "mean")
CACHE_DTYPES = ("float16", "float32")


def _choice(choices: tuple[str, ...], default: str, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text, "choices": list(choices)})


@dataclass
class PHRegConfig:
    """How to distill registers into a frozen model (Chen et al., "Vision Transformers with Self-Distilled Registers",
    https://arxiv.org/abs/2505.21501).

    The teacher is the model itself, without the adapter, its dense features denoised by test-time augmentation
    (:class:`~register_adapter.methods.distillation.DenoisedTeacher`). The student is the same model with
    ``num_register_tokens`` registers and trained copies of a few of its weights; it learns to give the denoised
    features from a single forward pass. Defaults are those of the paper's public code.

    Args:
        num_register_tokens: Registers the student gets (the paper uses 16).
        init: Their initialisation; ``"scaled_randn"`` is ``randn / sqrt(hidden_size)``, as in the paper.
        unlock_position_embeddings: Train a copy of the learned position table. ``None`` (default): where the family
            has one (every family but DINOv3, which rotates queries and keys instead); ``True`` on DINOv3 is an error.
        unlock_patch_embedding: Train a copy of the patch embedding.
        unlock_last_block: Train a copy of the last transformer block.
        cosine_weight: Weight of the ``1 - cosine similarity`` term of the loss.
        mse_weight: Weight of the mean squared error term of the loss.
        num_views: Views the teacher averages per image; view 0 is the image itself.
        max_shift: Largest shift of a view, as a fraction of the patch grid's side (rounded to whole patches).
        flip: Flip each view after the first horizontally with probability 0.5.
        num_candidates: Random offsets the views are chosen from by farthest-point sampling (default ``10 x
            num_views``, as the paper's code).
        fill: The colour of the pixels a shifted view takes from outside the image: ``"white"`` (the paper's),
            ``"black"`` or ``"mean"`` (the normalisation mean, 0 after normalising).
        view_batch_size: The teacher runs its views in batches of at most this many images.
        cache_targets: Compute the teacher's targets once per image and keep them on disk, so that no epoch runs the
            teacher again (the views are then drawn once per image instead of once per step).
        target_cache_dir: Where the target cache lives (default: ``register_adapter/distillation_targets`` in the
            ``datasets`` cache). Entries are keyed by the images, the teacher's weights and every setting above that
            changes the targets, so a cache computed for anything else is never used.
        cache_dtype: Precision of the cached targets.

    Example:

    >>> PHRegConfig(num_views=4).num_candidates
    40
    """

    num_register_tokens: int = field(default=16, metadata={"help": "Registers the student gets (the paper uses 16)."})
    init: str = _choice(INIT_METHODS, "scaled_randn", "Initialisation of the registers (scaled_randn: randn/sqrt(D)).")
    unlock_position_embeddings: bool | None = field(
        default=None,
        metadata={
            "help": "Train a copy of the learned position table. Default: where the family has one (all but DINOv3)."
        },
    )
    unlock_patch_embedding: bool = field(default=True, metadata={"help": "Train a copy of the patch embedding."})
    unlock_last_block: bool = field(default=True, metadata={"help": "Train a copy of the last transformer block."})
    cosine_weight: float = field(default=1.0, metadata={"help": "Weight of the (1 - cosine similarity) loss."})
    mse_weight: float = field(default=1.0, metadata={"help": "Weight of the mean squared error loss."})
    num_views: int = field(default=10, metadata={"help": "Views the teacher averages per image; view 0 is unshifted."})
    max_shift: float = field(
        default=0.15, metadata={"help": "Largest shift of a view, as a fraction of the patch grid's side."}
    )
    flip: bool = field(
        default=True, metadata={"help": "Flip views after the first horizontally with probability 0.5."}
    )
    num_candidates: int | None = field(
        default=None,
        metadata={"help": "Random offsets the views are picked from by farthest-point sampling (default 10 x views)."},
    )
    fill: str = _choice(FILLS, "white", "Colour of the pixels shifted in from outside the image.")
    view_batch_size: int = field(default=32, metadata={"help": "The teacher runs its views in batches of this size."})
    cache_targets: bool = field(
        default=False, metadata={"help": "Compute the teacher's targets once per image and keep them on disk."}
    )
    target_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the target cache lives (default: in the datasets cache)."}
    )
    cache_dtype: str = _choice(CACHE_DTYPES, "float16", "Precision of the cached targets.")

    def __post_init__(self) -> None:
        for name in ("num_register_tokens", "num_views", "view_batch_size"):
            setattr(self, name, _whole_number(name, getattr(self, name), 1))
        if self.num_candidates is None:
            self.num_candidates = 10 * self.num_views
        self.num_candidates = _whole_number("num_candidates", self.num_candidates, self.num_views - 1)
        for name, value, choices in (("init", self.init, INIT_METHODS), ("fill", self.fill, FILLS)):
            if value not in choices:
                raise InvalidConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
        if self.cache_dtype not in CACHE_DTYPES:
            raise InvalidConfigError(
                f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}."
            )
        if not (isinstance(self.max_shift, numbers.Real) and 0 <= self.max_shift < 1):
            raise InvalidConfigError(
                f"max_shift must be in [0, 1), a fraction of the patch grid's side, got {self.max_shift!r}. "
                "The paper uses 0.15."
            )
        for name in ("cosine_weight", "mse_weight"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and value >= 0):
                raise InvalidConfigError(f"{name} must be a number >= 0, got {value!r}.")
        if self.cosine_weight == 0 and self.mse_weight == 0:
            raise InvalidConfigError(
                "cosine_weight and mse_weight are both 0: the loss would be 0. The paper uses 1, 1."
            )

    def unlocked_weights(self, tower: VisionTower) -> list[str]:
        """The weights the student trains a copy of, for ``tower``'s family (see ``RegisterConfig.unlocked_weights``)."""
        position = self.unlock_position_embeddings
        if position is None:
            position = tower.position_embeddings is not None
        wanted = {
            "position_embeddings": position,
            "patch_embedding": self.unlock_patch_embedding,
            "last_block": self.unlock_last_block,
        }
        return [name for name, on in wanted.items() if on]

    def register_config_kwargs(self, tower: VisionTower) -> dict[str, Any]:
        """The ``RegisterConfig`` keyword arguments of the student's adapter."""
        return {
            "num_register_tokens": self.num_register_tokens,
            "init": self.init,
            "method": "distilled",
            "unlocked_weights": self.unlocked_weights(tower),
        }

    def teacher_kwargs(self) -> dict[str, Any]:
        """The :class:`~register_adapter.methods.distillation.DenoisedTeacher` keyword arguments."""
        return {
            "num_views": self.num_views,
            "max_shift": self.max_shift,
            "flip": self.flip,
            "num_candidates": self.num_candidates,
            "fill": self.fill,
            "view_batch_size": self.view_batch_size,
        }


def _whole_number(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)

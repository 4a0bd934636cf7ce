"""PH-Reg on a model with planted artifacts, measured against its artifact-free oracle: the proof of
``tests/test_distillation.py`` and the table of ``examples/distill/measure_planted.py``.

On 16 held-out scenes it measures the share of patch tokens far from the oracle (cosine < 0.5 between final normed
patch tokens) and the share of high-norm patch tokens in the residual stream (norm > 5x the block's median patch norm,
the largest share over the block outputs), before and after distilling on 16 other scenes (batch 8, learning rate
2e-2 decaying to 1e-3, target cache).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..architectures import find_vision_tower
from .planted import make_artifact_model
from .scenes import make_object_images


@dataclass
class PlantedDistillation:
    """Shares of patch tokens far from the oracle (raw model, denoised teacher when measured, student) and of
    high-norm patch tokens in the residual stream (before, after), and the seconds distillation took."""

    raw_far: float
    student_far: float
    high_before: float
    high_after: float
    seconds: float
    teacher_far: float | None = None

    @property
    def far_drop(self) -> float:
        return 1 - self.student_far / self.raw_far

    @property
    def high_drop(self) -> float:
        return 1 - self.high_after / self.high_before


def far_share(features: torch.Tensor, oracle: torch.Tensor) -> float:
    """Share of tokens whose cosine similarity to the oracle's is below 0.5."""
    return float((torch.nn.functional.cosine_similarity(features, oracle, dim=-1) < 0.5).float().mean())


@torch.no_grad()
def high_norm_share(model: torch.nn.Module, pixel_values: torch.Tensor, num_patches: int) -> float:
    """The largest share, over the block outputs (the model's own hidden states), of patch tokens whose norm exceeds
    5x that block's median patch norm."""
    hidden = find_vision_tower(model).module(pixel_values=pixel_values, output_hidden_states=True).hidden_states[1:]
    norms = [state[:, -num_patches:].norm(dim=-1) for state in hidden]
    return max(float((n > 5 * n.median()).float().mean()) for n in norms)


def distill_planted(
    family: str = "dinov2",
    *,
    steps: int = 200,
    folder: str | Path | None = None,
    measure_teacher: bool = False,
    **config,
) -> PlantedDistillation:
    """Distill ``make_artifact_model(family)`` for ``steps`` steps and measure it (see the module).

    Args:
        family: A planted family (:data:`~register_adapter.testing.PLANTABLE_FAMILIES`).
        steps: Optimiser steps.
        folder: Where the run and the target cache go (default: a temporary folder).
        measure_teacher: Also measure the denoised teacher (10 more forward passes per held-out scene).
        **config: :class:`~register_adapter.methods.distillation.PHRegConfig` settings (e.g. ``num_views=1``).
    """
    import datasets
    import PIL.Image

    from ..methods.distillation import DenoisedTeacher, PHRegConfig, distill_registers
    from ..methods.distillation.teacher import final_patch_tokens
    from ..training.distillation import DistillationTrainingArguments

    planted = make_artifact_model(family)  # a copy of its own: distillation adds the adapter in place
    train = make_object_images(16, planted.image_size, seed=1).images
    test = planted.preprocess(make_object_images(16, planted.image_size, seed=2).images)
    num_patches = (planted.image_size // planted.patch_size) ** 2
    with torch.no_grad():
        oracle = final_patch_tokens(find_vision_tower(planted.oracle), test)
        raw_far = far_share(final_patch_tokens(find_vision_tower(planted.model), test), oracle)
    teacher_far = None
    if measure_teacher:
        teacher = DenoisedTeacher(planted.model, processor=planted.processor)
        denoised = teacher(test, rngs=[np.random.default_rng([0, i]) for i in range(len(test))]).flatten(1, 2)
        teacher_far = far_share(denoised, oracle)
    high_before = high_norm_share(planted.model, test, num_patches)

    dataset = datasets.Dataset.from_dict({"image": [PIL.Image.fromarray(image) for image in train]})
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(folder) if folder is not None else Path(scratch)
        args = DistillationTrainingArguments(
            output_dir=str(root / "out"), max_steps=steps, learning_rate=2e-2, final_learning_rate=1e-3,
            per_device_train_batch_size=8, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
            logging_strategy="no",
        )  # fmt: skip
        start = time.perf_counter()
        ph_reg = PHRegConfig(cache_targets=True, target_cache_dir=str(root / "cache"), **config)
        student = distill_registers(planted.model, dataset, ph_reg, args, processor=planted.processor)
        seconds = time.perf_counter() - start
    with torch.no_grad():
        student_far = far_share(final_patch_tokens(find_vision_tower(student), test), oracle)
    high_after = high_norm_share(student, test, num_patches)
    return PlantedDistillation(raw_far, student_far, high_before, high_after, seconds, teacher_far)

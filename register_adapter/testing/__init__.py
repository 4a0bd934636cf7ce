"""Models with planted artifacts and scenes with known objects: ground truth for tests, demos and benchmarks,
without downloading weights."""

from .distillation import PlantedDistillation, distill_planted
from .planted import FULL_STRENGTH_FRACTION, PLANTABLE_FAMILIES, ArtifactModel, make_artifact_model
from .scenes import ObjectImages, make_object_images

__all__ = [
    "FULL_STRENGTH_FRACTION",
    "PLANTABLE_FAMILIES",
    "ArtifactModel",
    "ObjectImages",
    "PlantedDistillation",
    "distill_planted",
    "make_artifact_model",
    "make_object_images",
]

"""Seeing artifacts and proving them gone: token norms on the residual stream, thresholds, LOST object discovery,
and pictures."""

from .artifacts import ArtifactReport, ImageArtifacts, LayerStats, block_output_norms, check_layer, find_artifacts
from .discovery import discover_objects
from .norm_stats import NormStats
from .thresholds import Threshold, bimodal_threshold, check_threshold, resolve_threshold

__all__ = [
    "ArtifactReport",
    "ImageArtifacts",
    "LayerStats",
    "NormStats",
    "Threshold",
    "bimodal_threshold",
    "block_output_norms",
    "check_layer",
    "check_threshold",
    "discover_objects",
    "find_artifacts",
    "resolve_threshold",
]

"""The PH-Reg teacher: a frozen model's dense features, denoised by test-time augmentation (arXiv 2505.21501).

Artifacts sit at fixed positions of the patch grid and depend on the content there; the content itself moves with
the image. So the teacher looks at each image several times, shifted by whole patches (and flipped), maps every
view's patch features back to where that content sits in the image, and averages them: what moves with the content
stays, what stays at a grid position is spread thin.

The features are the tower's **final normed patch tokens**: the output of its last block after its final norm, the
patch tokens of ``last_hidden_state`` for every family but CLIP. Per family:

============================================  =====================================================
family                                        features
============================================  =====================================================
ViT, DeiT, DINOv2 (with registers), I-JEPA    ``layernorm`` of the last block's output
DINOv3                                        ``norm`` of the last block's output
CLIP                                          ``post_layernorm`` of every token (transformers applies
                                              it to the pooled CLS token only; dense CLIP uses do)
SigLIP                                        ``post_layernorm`` (before the attention-pooling head)
AIMv2                                         ``rms_norm``
============================================  =====================================================

SigLIP2 (pre-patchified pixel sequences) and ViTMAE (random masking shuffles the patches) cannot be denoised this
way and are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...architectures import VisionTower, find_vision_tower
from ...errors import InvalidConfigError, UnsupportedModelError
from ...forward import eval_mode, run_tower
from ...geometry import patch_grid
from ...hooks import capture
from .config import PHRegConfig


def check_distillable(tower: VisionTower) -> None:
    """Refuse families whose patch tokens do not lie on a fixed patch grid of a (B, 3, H, W) image.

    Raises:
        UnsupportedModelError: SigLIP2 (pre-patchified sequences) or ViTMAE (random masking); the message says why.
    """
    name = type(tower.module).__name__
    if not tower.spec.image_input:
        raise UnsupportedModelError(
            f"{name} takes pre-patchified pixel sequences with per-image shapes, not images on a fixed patch grid: "
            "the teacher's shifted views cannot be made for it. Distill a model that takes (B, 3, H, W) images."
        )
    if tower.spec.random_patch_order:
        raise UnsupportedModelError(
            f"{name} drops and shuffles patches at random (MAE masking), so its patch tokens do not lie on the patch "
            "grid that the teacher's views are mapped back to. Distill a model without random masking."
        )


def final_patch_tokens(tower: VisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's final normed patch tokens (see the module docstring), (B, h * w, D), in the autograd graph.

    The forward pass stops after the last block: poolers and heads do not run.
    """
    height, width = patch_grid(pixel_values.shape, tower.patch_size)
    last = tower.blocks[-1]
    with capture(outputs=[last], stop=True, detach=False) as captured:
        run_tower(tower, pixel_values)
    return tower.final_norm(captured[last])[:, -height * width :]  # patches come last in every layout


def crop_to_grid(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``pixel_values`` (..., H, W) without the bottom rows and right columns that fill no whole patch (the patch
    embedding ignores them; a flipped view would move them into the first patch column)."""
    height, width = patch_grid(pixel_values.shape, patch_size)
    return pixel_values[..., : height * patch_size, : width * patch_size]


def max_offsets(max_shift: float, grid: tuple[int, int]) -> tuple[int, int]:
    """The largest shift of a view, in whole patches, along the rows and the columns of ``grid``.

    Raises:
        InvalidConfigError: a view shifted that far would show none of the image's patches.
    """
    limits = tuple(int(round(max_shift * side)) for side in grid)
    for limit, side, axis in zip(limits, grid, ("rows", "columns")):
        if limit >= side:
            raise InvalidConfigError(
                f"max_shift={max_shift} shifts views by up to {limit} patches on a grid of {side} patch {axis}: a "
                f"view shifted that far shows none of the image's patches. Use a max_shift below "
                f"{(side - 0.5) / side:.3g}, or larger images."
            )
    return limits


def farthest_point_sample(candidates: np.ndarray, count: int, start: np.ndarray) -> np.ndarray:
    """``count`` points: ``start`` (2,), then repeatedly the candidate (N, 2) farthest from every point taken."""
    chosen = [np.asarray(start)]
    distance = ((candidates - start) ** 2).sum(-1)  # (N,)
    for _ in range(count - 1):
        index = int(distance.argmax())
        chosen.append(candidates[index])
        distance = np.minimum(distance, ((candidates - candidates[index]) ** 2).sum(-1))
    return np.stack(chosen)  # (count, 2)


@dataclass(frozen=True)
class Views:
    """The views of one image: ``offsets`` (V, 2) in whole patches, (rows, columns); ``flips`` (V,) bool.

    View ``v`` shows the image moved by ``-offsets[v]`` patches: its patch ``(i, j)`` holds the image's patch
    ``(i + offsets[v, 0], j + offsets[v, 1])`` (``j`` counted from the right when ``flips[v]``). View 0 is the image.
    """

    offsets: np.ndarray
    flips: np.ndarray


class DenoisedTeacher:
    """Dense features of a frozen model, denoised by test-time augmentation: PH-Reg's teacher (Chen et al., "Vision
    Transformers with Self-Distilled Registers", https://arxiv.org/abs/2505.21501).

    Each image is seen in ``num_views`` views: view 0 is the image itself; the others are shifted by whole patches, at
    most ``max_shift`` of the grid's side in each direction (offsets picked by farthest-point sampling among
    ``num_candidates`` random ones, so they spread out), and flipped horizontally with probability 0.5. Pixels a
    shift takes from outside the image get the ``fill`` colour. Every view's patch features go back to the grid
    position their content has in the image and are averaged over the views that cover it (view 0 covers every
    position). Views run in batches of at most ``view_batch_size`` images.

    The teacher is the model itself: a ``PeftModel`` runs with its adapters disabled (``disable_adapter()``) and in
    eval mode, so no second copy of the weights is held.

    Args:
        model: A model of a supported family, or a ``PeftModel`` around one.
        num_views, max_shift, flip, num_candidates, fill, view_batch_size: As in :class:`PHRegConfig`.
        processor: The image processor that made the pixel values; its ``image_mean`` / ``image_std`` give the fill
            colour in normalised units (default: mean = std = 0.5).

    Example:

    >>> import numpy as np, torch
    >>> from register_adapter.tiny import build_tiny_model
    >>> teacher = DenoisedTeacher(build_tiny_model("tiny-dinov2"), num_views=4)
    >>> teacher(torch.rand(2, 3, 30, 30), rngs=[np.random.default_rng(i) for i in range(2)]).shape
    torch.Size([2, 15, 15, 32])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_views: int = 10,
        max_shift: float = 0.15,
        flip: bool = True,
        num_candidates: int | None = None,
        fill: str = "white",
        view_batch_size: int = 32,
        processor: Any = None,
    ) -> None:
        settings = PHRegConfig(
            num_views=num_views,
            max_shift=max_shift,
            flip=flip,
            num_candidates=num_candidates,
            fill=fill,
            view_batch_size=view_batch_size,
        )  # one place checks the values
        self.model = model
        self.tower = find_vision_tower(model)
        check_distillable(self.tower)
        self.num_views, self.max_shift, self.flip = settings.num_views, settings.max_shift, settings.flip
        self.num_candidates, self.fill, self.view_batch_size = (
            settings.num_candidates,
            settings.fill,
            settings.view_batch_size,
        )
        mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
        std = getattr(processor, "image_std", None) or [0.5, 0.5, 0.5]
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        colour = {"white": torch.ones(3), "black": torch.zeros(3), "mean": mean}[fill]
        self.fill_value = (colour - mean) / std  # (3,), in the units of the pixel values

    # -- the views ----------------------------------------------------------------------------------------------------

    def views(self, grid: tuple[int, int], rng: np.random.Generator) -> Views:
        """The views of one image on a patch grid of ``grid`` (rows, columns), drawn with ``rng``."""
        limits = np.asarray(max_offsets(self.max_shift, grid))
        candidates = np.stack(
            [rng.integers(-limit, limit, size=self.num_candidates, endpoint=True) for limit in limits], axis=1
        )  # (N, 2)
        offsets = farthest_point_sample(candidates, self.num_views, start=np.zeros(2, dtype=np.int64))
        flips = (rng.random(self.num_views) < 0.5) & self.flip
        flips[0] = False
        return Views(offsets=offsets.astype(np.int64), flips=flips)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the targets besides the weights and the images (for cache keys)."""
        return {
            "num_views": self.num_views,
            "max_shift": self.max_shift,
            "flip": self.flip,
            "num_candidates": self.num_candidates,
            "fill": [round(float(v), 6) for v in self.fill_value],
        }

    def fingerprint(self) -> str:
        """A hash of the teacher's weights, buffers, config and settings: equal for equal teachers, whether the model
        holds adapters or not (their state is left out)."""
        module = self.tower.module
        adapter_state = {
            id(tensor)
            for layer in module.modules()
            if isinstance(layer, BaseTunerLayer)
            for name in layer.adapter_layer_names
            for tensor in itertools.chain(getattr(layer, name).parameters(), getattr(layer, name).buffers())
        }
        digest = hashlib.sha256()
        config = module.config
        digest.update(f"{type(module).__name__} {config._attn_implementation} {config.to_json_string()}".encode())
        digest.update(str(self.settings()).encode())
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if id(tensor) in adapter_state:
                continue
            digest.update(name.replace("base_layer.", "").encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # -- the targets --------------------------------------------------------------------------------------------------

    def __call__(self, pixel_values: torch.Tensor, rngs: Sequence[np.random.Generator] | None = None) -> torch.Tensor:
        """The denoised final normed patch tokens of ``pixel_values`` (B, 3, H, W): (B, h, w, D), float32.

        Args:
            pixel_values: Normalised images; rows and columns that fill no whole patch are ignored.
            rngs: One generator per image, which draws its views (default: fresh ones from numpy's entropy).
        """
        device = next(self.tower.module.parameters()).device
        pixel_values = crop_to_grid(pixel_values, self.tower.patch_size).to(device)
        batch = pixel_values.shape[0]
        grid = patch_grid(pixel_values.shape, self.tower.patch_size)
        rngs = rngs if rngs is not None else [np.random.default_rng() for _ in range(batch)]
        plans = [self.views(grid, rng) for rng in rngs]
        offsets = np.stack([plan.offsets for plan in plans])  # (B, V, 2)
        flips = np.stack([plan.flips for plan in plans])  # (B, V)
        destination = self._destinations(
            torch.as_tensor(offsets, device=device), torch.as_tensor(flips, device=device), grid
        )  # (B, V, h * w), -1 where a view holds fill
        sums = counts = None
        with torch.no_grad(), self._frozen():
            for index, views in self._view_batches(pixel_values, offsets, flips):
                features = final_patch_tokens(self.tower, views).float()  # (b, h * w, D)
                if sums is None:
                    sums = features.new_zeros(batch * grid[0] * grid[1], features.shape[-1])
                    counts = features.new_zeros(batch * grid[0] * grid[1])
                where = destination.flatten(0, 1)[index]  # (b, h * w)
                valid = where >= 0
                sums.index_add_(0, where[valid], features[valid])
                counts.index_add_(0, where[valid], torch.ones_like(where[valid], dtype=counts.dtype))
        return (sums / counts[:, None]).view(batch, *grid, -1)  # (B, h, w, D)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """The model without its adapters, in eval mode."""
        disable = getattr(self.model, "disable_adapter", None)
        with eval_mode(self.model), disable() if callable(disable) else contextlib.nullcontext():
            yield

    def _destinations(self, offsets: torch.Tensor, flips: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """For every view patch, the flat index of the image patch its content comes from (over the whole batch), or
        -1 where the view shows fill: (B, V, h * w)."""
        height, width = grid
        batch = offsets.shape[0]
        device = offsets.device
        rows = torch.arange(height, device=device).view(1, 1, height, 1) + offsets[..., 0, None, None]  # (B, V, h, 1)
        columns = torch.arange(width, device=device).view(1, 1, 1, width)
        columns = torch.where(flips[..., None, None], width - 1 - columns, columns) + offsets[..., 1, None, None]
        inside = (rows >= 0) & (rows < height) & (columns >= 0) & (columns < width)  # (B, V, h, w)
        image = torch.arange(batch, device=device).view(batch, 1, 1, 1) * height * width
        flat = torch.where(inside, image + rows * width + columns, -1)  # (B, V, h, w)
        return flat.flatten(2)

    def _view_batches(
        self, pixel_values: torch.Tensor, offsets: np.ndarray, flips: np.ndarray
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of at most ``view_batch_size`` views: (indices into the flattened (B * V) views, pixels)."""
        patch = self.tower.patch_size
        limits = np.abs(offsets).max(axis=(0, 1)).tolist()  # the largest shift, rows and columns
        pad_rows, pad_columns = limits[0] * patch, limits[1] * patch
        batch, channels, height, width = pixel_values.shape
        fill = self.fill_value.to(pixel_values.device, pixel_values.dtype).view(1, channels, 1, 1)
        padded = fill.expand(batch, channels, height + 2 * pad_rows, width + 2 * pad_columns).clone()
        padded[..., pad_rows : pad_rows + height, pad_columns : pad_columns + width] = pixel_values
        pairs = [(b, v) for b in range(batch) for v in range(offsets.shape[1])]
        for start in range(0, len(pairs), self.view_batch_size):
            chunk = pairs[start : start + self.view_batch_size]
            views = []
            for b, v in chunk:
                top = pad_rows + int(offsets[b, v, 0]) * patch
                left = pad_columns + int(offsets[b, v, 1]) * patch
                view = padded[b, :, top : top + height, left : left + width]  # (3, H, W)
                views.append(view.flip(-1) if flips[b, v] else view)
            index = torch.as_tensor([b * offsets.shape[1] + v for b, v in chunk], device=pixel_values.device)
            yield index, torch.stack(views)  # (b, 3, H, W)

"""Tiny models with *planted* artifacts, and synthetic images with known objects, for tests and demos.

Large trained ViTs write high-norm "artifact" tokens into low-information background patches (Darcet et al.,
https://arxiv.org/abs/2309.16588). Jiang et al. (https://arxiv.org/abs/2506.08010) traced them to a few MLP
"register neurons" in a middle layer that fire on those patches and write a large vector into the residual stream.
No pretrained weights can be downloaded in CI, and randomly initialised models have no artifacts, so
:func:`make_artifact_model` builds a small model of a supported family and plants that mechanism by hand:

* a flip-symmetric patch embedding (every filter equals its horizontal mirror image) and small position embeddings,
  so features are roughly shift- and flip-equivariant, as PH-Reg's test-time augmentation expects;
* a figure-ground unit in the first block: two MLP neurons read local contrast and mark patches as textured
  (foreground) or plain (background), so that object and background features are anti-correlated, as LOST expects;
* register neurons in a middle block: they fire on plain patches at a few fixed grid positions (about 2 % of the
  tokens of a typical image) and write a vector about 15x the median token norm;
* an attention head in the last block whose CLS query looks for that vector, as the CLS attention of trained ViTs
  concentrates on artifacts.

Every other block weight is random and small (std 0.02, zero biases), so the residual stream stays close to the
embeddings. The returned :class:`ArtifactModel` knows its ground truth (which neurons, which positions per image) and
carries the *oracle*: the same model with the planted write removed.

>>> from register_adapter.testing import make_artifact_model, make_object_images
>>> planted = make_artifact_model("dinov2")
>>> scene = make_object_images(2, planted.image_size)
>>> pixel_values = planted.preprocess(scene.images)  # (2, 3, 32, 32)
>>> planted.artifact_mask(pixel_values).shape
torch.Size([2, 16, 16])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..architectures import VisionTower, find_vision_tower
from ..errors import InvalidConfigError, UnsupportedModelError
from ..forward import run_tower
from ..geometry import patch_grid
from ..hooks import capture
from ..tiny import TINY_MODELS, build_tiny_model
from .scenes import make_object_images

# Residual-stream channels with a planted meaning; every other channel carries patch content.
_CONST, _GATE, _FIGURE = 0, 1, 2
_COLOR = slice(3, 6)
_CONTENT_START = 6
_FIGURE_UNIT, _GROUND_UNIT = 0, 1  # hidden units of the first MLP
_GATE_LEVEL = 2.0
_FIGURE_LEVEL = 0.5  # figure-channel value of textured patches, relative to their median norm

_MEAN = _STD = (0.5, 0.5, 0.5)
#: A token is a ground-truth artifact when the register neurons fire at least this fraction of their activation on a
#: plain background patch: the write then puts it at about 10x the median norm or more (15x at full strength).
FULL_STRENGTH_FRACTION = 0.5
#: The families make_artifact_model plants artifacts in (plain fc1 -> GELU -> fc2 MLPs, a learned position table).
PLANTABLE_FAMILIES = ("vit", "deit", "dinov2", "dinov2-with-registers", "clip-vision", "clip", "siglip", "ijepa")


@dataclass
class ArtifactModel:
    """A model with planted artifacts and its ground truth. Built by :func:`make_artifact_model`.

    Attributes:
        model: The model with artifacts (an ordinary ``transformers`` model, in eval mode).
        oracle: The same model with the planted write removed: what a perfect artifact remover would give.
        family: The family name passed to :func:`make_artifact_model`.
        layer: Artifacts appear in ``hidden_states[layer]``: the output of block ``layer`` (1-based), whose MLP holds
            the register neurons.
        neurons: The register neurons, as ``(layer, unit)`` pairs (``unit`` indexes the MLP hidden activation, the
            input of the MLP output projection).
        image_size: Side of the square input images, in pixels.
        patch_size: Side of one patch, in pixels.
        positions: (G,) flat grid indices where the register neurons may fire (the position gate).
        firing_threshold: A patch holds an artifact when the summed activation of the register neurons exceeds it:
            ``FULL_STRENGTH_FRACTION`` (one half) of their activation on a plain, gated-in patch of the calibration
            scenes. On synthetic scenes the neurons fire fully or not at all; on photos, faintly textured patches
            make them fire weakly, and those tokens (a few times the median norm) are not counted.
        processor: The image processor the model expects (resize to ``image_size``, mean = std = 0.5).
    """

    model: nn.Module
    oracle: nn.Module
    family: str
    layer: int
    neurons: list[tuple[int, int]]
    image_size: int
    patch_size: int
    positions: torch.Tensor
    firing_threshold: float
    processor: Any = field(repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        return patch_grid((self.image_size, self.image_size), self.patch_size)

    def preprocess(self, images: np.ndarray | Sequence[Any]) -> torch.Tensor:
        """Turn images (uint8 (n, H, W, 3) or a list of PIL images) into pixel values (n, 3, S, S)."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def register_activations(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Summed activation of the register neurons at every patch, (B, h, w)."""
        h, w = self.grid
        return _register_activations(find_vision_tower(self.model), self.neurons, pixel_values, h * w).reshape(
            -1, h, w
        )

    def artifact_mask(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Ground truth: where the planted neurons wrote an artifact near full strength (activation above
        ``firing_threshold``), (B, h, w) bool."""
        return self.register_activations(pixel_values) > self.firing_threshold

    def artifact_positions(self, pixel_values: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Ground truth per image: the ``(row, column)`` grid positions holding an artifact."""
        return [[(int(r), int(c)) for r, c in mask.nonzero().tolist()] for mask in self.artifact_mask(pixel_values)]


def _plain_mlp(tower: VisionTower, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(fc1, fc2) of a block's MLP; gated (SwiGLU) MLPs have no single input row per hidden unit."""
    fc2 = tower.mlp_out_proj(block)
    inputs = [m for m in block.modules() if isinstance(m, nn.Linear) and m.out_features == fc2.in_features]
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"{type(block).__name__} has a gated MLP; planted artifacts need a plain fc1 -> GELU -> fc2 MLP."
        )
    return inputs[0], fc2


def _flip_symmetric_filters(generator: torch.Generator, count: int, patch_size: int) -> torch.Tensor:
    """Random filters (count, 3, p, p) equal to their horizontal mirror image, zero-mean per colour channel and with
    unit norm: they respond to texture, not to colour, and a flipped patch gives the same response."""
    filters = torch.randn(count, 3, patch_size, patch_size, generator=generator)
    filters = filters + filters.flip(-1)
    filters = filters - filters.mean(dim=(-2, -1), keepdim=True)
    return filters / filters.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]


def _embedding_parameters(tower: VisionTower) -> tuple[nn.Conv2d, torch.Tensor, list[torch.Tensor]]:
    """The patch-embedding conv, the position-embedding table viewed as (rows, D), and the learned tokens (CLS,
    native registers, mask token) of the tower's embeddings."""
    conv, positions = tower.patch_embedding, tower.position_embeddings
    if not isinstance(conv, nn.Conv2d) or positions is None:
        raise UnsupportedModelError(
            f"{type(tower.embeddings).__name__} has no convolutional patch embedding with a learned position table; "
            "planted artifacts need both."
        )
    skip = {id(p) for p in conv.parameters()} | {id(positions)}
    tokens = [p.data for p in tower.embeddings.parameters() if id(p) not in skip]
    return conv, positions.data.view(-1, positions.shape[-1]), tokens


def _capture(
    tower: VisionTower, pixel_values: torch.Tensor, inputs: Sequence[nn.Module] = (), output: nn.Module | None = None
) -> list[torch.Tensor]:
    """Inputs of ``inputs`` and the output of ``output`` (appended last) on ``pixel_values``; the forward pass stops
    at the last of them."""
    outputs = [output] if output is not None else []
    with torch.no_grad(), capture(outputs, inputs, stop=True) as captured:
        run_tower(tower, pixel_values)
    return [captured[m] for m in [*inputs, *outputs]]


def _build(family: str, seed: int, **sizes: Any) -> nn.Module:
    name = f"tiny-{family}"
    if family not in PLANTABLE_FAMILIES or name not in TINY_MODELS:
        raise UnsupportedModelError(
            f"Cannot plant artifacts in family {family!r}. Available: {', '.join(PLANTABLE_FAMILIES)}."
        )
    base = TINY_MODELS[name][1]
    if "vision_config" in base:  # full CLIP: the sizes are those of the vision tower
        return build_tiny_model(name, seed=seed, vision_config={**base["vision_config"], **sizes})
    return build_tiny_model(name, seed=seed, **sizes)


def make_artifact_model(
    family: str = "dinov2",
    *,
    image_size: int = 32,
    patch_size: int = 2,
    hidden_size: int = 64,
    num_layers: int = 6,
    num_heads: int = 4,
    layer: int | None = None,
    num_neurons: int = 2,
    position_fraction: float = 0.025,
    artifact_ratio: float = 15.0,
    seed: int = 0,
) -> ArtifactModel:
    """Build a small model of ``family`` with planted artifacts (see the module docstring for the mechanism).

    Args:
        family: One of ``vit``, ``deit``, ``dinov2``, ``dinov2-with-registers``, ``clip-vision``, ``clip`` (full
            CLIP, artifacts in the vision tower), ``siglip``, ``ijepa``.
        image_size: Side of the square input images, in pixels.
        patch_size: Side of one patch, in pixels.
        hidden_size: Width of the residual stream (at least 16).
        num_layers: Number of transformer blocks.
        num_heads: Attention heads per block.
        layer: Block (1-based) whose MLP holds the register neurons; artifacts appear in ``hidden_states[layer]``.
            Default: the middle block, ``num_layers // 2``.
        num_neurons: How many register neurons write the artifact.
        position_fraction: Fraction of grid positions where the register neurons may fire. Only plain patches fire,
            so about ``position_fraction`` x (background fraction) of the tokens become artifacts.
        artifact_ratio: Target norm of an artifact token, as a multiple of the median patch-token norm.
        seed: Seed of every random choice; the same arguments give the same model.

    Returns:
        An :class:`ArtifactModel` with the model, the oracle and the ground truth.
    """
    layer = num_layers // 2 if layer is None else layer
    if not 2 <= layer <= num_layers or hidden_size < 16:
        raise InvalidConfigError(
            f"layer must be in [2, num_layers={num_layers}] and hidden_size >= 16; got layer={layer}, "
            f"hidden_size={hidden_size}."
        )
    generator = torch.Generator().manual_seed(seed)
    model = _build(
        family,
        seed,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        mlp_ratio=4,
        image_size=image_size,
        patch_size=patch_size,
    )  # DINOv2 sizes its MLP by mlp_ratio
    tower = find_vision_tower(model)
    rows, columns = patch_grid((image_size, image_size), patch_size)
    num_patches = rows * columns
    mlps = [_plain_mlp(tower, block) for block in tower.blocks]

    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=list(_MEAN), image_std=list(_STD)
    )
    with torch.no_grad():
        _reinit_blocks(tower, generator)
        gate = _plant_embeddings(tower, generator, num_patches, patch_size, position_fraction)
    calibration = make_object_images(8, image_size, seed=seed + 1)
    pixel_values = processor(images=list(calibration.images), return_tensors="pt")["pixel_values"]
    plain = _plain_patches(pixel_values, patch_size)  # (n, N) bool
    with torch.no_grad():
        ground = _plant_figure_ground(model, tower, mlps[0], pixel_values, plain)
        neurons, threshold, artifacts = _plant_register_neurons(
            model, tower, mlps[layer - 1], layer, pixel_values, ground & gate, num_neurons, artifact_ratio, generator
        )
        if tower.spec.has_cls and layer < num_layers:
            _plant_cls_attention(model, tower, pixel_values, artifacts, num_heads)
    oracle = copy.deepcopy(model)
    oracle_tower = find_vision_tower(oracle)
    with torch.no_grad():
        oracle_tower.mlp_out_proj(oracle_tower.blocks[layer - 1]).weight[:, [unit for _, unit in neurons]] = 0.0
    return ArtifactModel(
        model=model.eval(),
        oracle=oracle.eval(),
        family=family,
        layer=layer,
        neurons=neurons,
        image_size=image_size,
        patch_size=patch_size,
        positions=gate.nonzero().flatten(),
        firing_threshold=threshold,
        processor=processor,
    )


def _reinit_blocks(tower: VisionTower, generator: torch.Generator) -> None:
    """Small random blocks in every family (ViT's init: std 0.02, zero biases, unit norms), so that the residual
    stream stays close to the embeddings whatever the family's own init scheme."""
    for block in tower.blocks:
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def _plant_embeddings(
    tower: VisionTower, generator: torch.Generator, num_patches: int, patch_size: int, position_fraction: float
) -> torch.Tensor:
    """Set the patch embedding and position table; returns the position gate (N,) bool."""
    conv, table, tokens = _embedding_parameters(tower)
    hidden = conv.out_channels
    weight = torch.zeros_like(conv.weight)  # (D, 3, p, p)
    # Colour channels see the patch mean; content channels see texture (zero-mean, flip-symmetric filters).
    for c in range(3):
        weight[_COLOR.start + c, c] = 0.1 / patch_size**2
    weight[_CONTENT_START:] = 2.0 * _flip_symmetric_filters(generator, hidden - _CONTENT_START, patch_size)
    conv.weight.copy_(weight)
    if conv.bias is not None:
        conv.bias.zero_()
    prefix = table.shape[0] - num_patches
    table.copy_(torch.randn(table.shape, generator=generator) * 0.02)
    gate = torch.zeros(num_patches, dtype=torch.bool)
    count = max(1, round(position_fraction * num_patches))
    gate[torch.randperm(num_patches, generator=generator)[:count]] = True
    table[prefix:, _CONST] = 1.0
    table[prefix:, _GATE] = torch.where(gate, _GATE_LEVEL, -_GATE_LEVEL)
    table[prefix:, _FIGURE] = 0.0
    table[:prefix, _CONST:_CONTENT_START] = 0.0
    table[:prefix, _GATE] = -_GATE_LEVEL
    for token in tokens:  # CLS, native registers, mask token: never gated in, each with its own direction
        token[..., _CONST:_CONTENT_START] = 0.0
        token[..., _GATE] = -_GATE_LEVEL
        content = torch.randn(token[..., _CONTENT_START:].shape, generator=generator)
        token[..., _CONTENT_START:] = 2.0 * content / content.norm(dim=-1, keepdim=True)
    return gate


def _plain_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, N) bool: patches without any pixel variation."""
    patches = pixel_values.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)  # (B, 3, h, w, p, p)
    spread = patches.flatten(-2).std(-1).amax(1)  # (B, h, w)
    return (spread < 1e-6).flatten(1)


def _split_threshold(positive: torch.Tensor, negative: torch.Tensor, name: str) -> float:
    low, high = negative.max().item(), positive.min().item()
    if not high > low:
        raise RuntimeError(f"Planting failed: the {name} signal does not separate the two patch classes.")
    return (low + high) / 2


def _plant_figure_ground(
    model: nn.Module,
    tower: VisionTower,
    mlp: tuple[nn.Linear, nn.Linear],
    pixel_values: torch.Tensor,
    plain: torch.Tensor,
) -> torch.Tensor:
    """Two neurons in the first MLP: one fires on textured patches and writes into the figure channel, one fires on
    plain patches and writes the opposite sign. The contrast signal is the normalised constant channel: LayerNorm
    divides it by the token's spread, which texture makes large. The plain-patch write is sized so that plain and
    textured patches leave the block with similar norms, as in trained ViTs.

    Returns:
        (B, N) bool: the patches the model now treats as plain background.
    """
    fc1, fc2 = mlp
    num_patches = plain.shape[1]
    signal = _capture(tower, pixel_values, [fc1])[0][:, -num_patches:, _CONST]  # (B, N)
    # Weakly textured patches count as plain too: the split sits a quarter of the way from plain to textured.
    low, high = signal[~plain].median().item(), signal[plain].min().item()
    threshold = high - (high - low) / 4
    scale = 4.0 / (high - low)
    for unit, sign in ((_FIGURE_UNIT, -1.0), (_GROUND_UNIT, 1.0)):
        fc1.weight[unit] = 0.0
        fc1.weight[unit, _CONST] = sign * scale
        fc1.bias[unit] = -sign * scale * threshold
        fc2.weight[:, unit] = 0.0
        fc2.weight[_FIGURE, unit] = -sign
    activations, output = _capture(tower, pixel_values, [fc2], tower.blocks[0])
    activations, output = activations[:, -num_patches:], output[:, -num_patches:]
    rest = torch.cat([output[..., :_FIGURE], output[..., _FIGURE + 1 :]], dim=-1).norm(dim=-1)  # (B, N)
    textured_norm = output.norm(dim=-1)[~plain].median()
    # At least twice the rest of a plain token, so that the figure channel dominates it even when the family
    # normalises the embeddings (CLIP's pre-LayerNorm blows the position gate of a plain patch up to the full norm).
    ground = (textured_norm**2 - rest[plain].median() ** 2).clamp_min(0).sqrt().clamp_min(2 * rest[plain].median())
    fc2.weight[_FIGURE, _GROUND_UNIT] = -ground / activations[..., _GROUND_UNIT][plain].median()
    figure = _FIGURE_LEVEL * textured_norm
    fc2.weight[_FIGURE, _FIGURE_UNIT] = figure / activations[..., _FIGURE_UNIT][~plain].median()
    return activations[..., _GROUND_UNIT] > activations[..., _FIGURE_UNIT]


def _plant_register_neurons(
    model: nn.Module,
    tower: VisionTower,
    mlp: tuple[nn.Linear, nn.Linear],
    layer: int,
    pixel_values: torch.Tensor,
    target: torch.Tensor,
    num_neurons: int,
    ratio: float,
    generator: torch.Generator,
) -> tuple[list[tuple[int, int]], float, torch.Tensor]:
    """Register neurons in the MLP of block ``layer`` that fire on ``target`` patches (plain and gated in).

    Returns:
        The neurons, the firing threshold of their summed activation, and where they fire on ``pixel_values``.
    """
    fc1, fc2 = mlp
    units = torch.randperm(fc2.in_features, generator=generator)[:num_neurons].tolist()
    num_patches = target.shape[1]
    block = tower.blocks[layer - 1]
    inputs, outputs = _capture(tower, pixel_values, [fc1], block)
    inputs, outputs = inputs[:, -num_patches:], outputs[:, -num_patches:]  # (B, N, D)
    signal = inputs[..., _GATE] - inputs[..., _FIGURE]  # (B, N): plain and gated in
    threshold = _split_threshold(signal[target], signal[~target], "register-gate")
    scale = 4.0 / (signal[target].min().item() - threshold)  # pre-activation >= 4 on every target, <= -4 elsewhere
    # Random content directions plus a shared negative constant-channel part: artifact tokens end up
    # anti-correlated with every patch, as in trained ViTs where they hold no local information.
    directions = torch.randn(num_neurons, fc2.out_features, generator=generator)
    directions[:, :_CONTENT_START] = 0.0
    directions = 0.6 * directions / directions.norm(dim=1, keepdim=True)  # (k, D)
    directions[:, _CONST] = -0.8
    for i, unit in enumerate(units):
        fc1.weight[unit] = 0.0
        fc1.weight[unit, _GATE] = scale
        fc1.weight[unit, _FIGURE] = -scale
        fc1.bias[unit] = -scale * threshold
        fc2.weight[:, unit] = directions[i]
    # Scale the write w so that artifact tokens x + c w reach `ratio` x the median patch norm at the output of the
    # block: c solves |x + c w| = goal per token; the median c is used.
    activations, written = _capture(tower, pixel_values, [fc2], block)
    activations = activations[:, -num_patches:, units].sum(-1)  # (B, N)
    x = outputs[target]  # (T, D)
    w = written[:, -num_patches:][target] - x  # (T, D)
    goal = ratio * outputs.norm(dim=-1)[~target].median()
    xw, ww = (x * w).sum(-1), (w * w).sum(-1)  # (T,)
    c = (-xw + (xw**2 - ww * ((x * x).sum(-1) - goal**2)).sqrt()) / ww  # (T,)
    fc2.weight[:, units] *= c.median()
    # Ground truth is a write near full strength: at least half the activation of a plain, gated-in patch. On
    # photos, faintly textured patches make the neurons fire weakly; those tokens are not counted as artifacts.
    firing_threshold = FULL_STRENGTH_FRACTION * activations[target].median().item()
    return [(layer, unit) for unit in units], firing_threshold, activations > firing_threshold


def _register_activations(
    tower: VisionTower, neurons: list[tuple[int, int]], pixel_values: torch.Tensor, num_patches: int
) -> torch.Tensor:
    """Summed activation of the register neurons at every patch, (B, N); patches come last in every layout."""
    layer = neurons[0][0]
    (activations,) = _capture(tower, pixel_values, [tower.mlp_out_proj(tower.blocks[layer - 1])])  # (B, S, I)
    return activations[:, -num_patches:, [unit for _, unit in neurons]].sum(-1)


def _plant_cls_attention(
    model: nn.Module,
    tower: VisionTower,
    pixel_values: torch.Tensor,
    artifacts: torch.Tensor,
    num_heads: int,
    logit: float = 10.0,
) -> None:
    """Make the first head of the last block attend from CLS to artifact tokens: a rank-one change of its query and
    key projections adds about ``logit`` to the attention logit of CLS on an artifact."""
    block = tower.blocks[-1]
    query, key = tower.attention_projection(block, "queries"), tower.attention_projection(block, "keys")
    (normed,) = _capture(tower, pixel_values, [query])  # (B, S, D), the input of the attention projections
    cls_dir = normed[:, 0].mean(0)  # (D,)
    cls_dir[:_CONTENT_START] = 0.0  # the CLS token's own direction, not the gate it shares with patches
    cls_dir = cls_dir / cls_dir.norm()
    art_dir = normed[:, -artifacts.shape[1] :][artifacts].mean(0)  # (D,)
    art_dir[:_CONTENT_START] = 0.0  # only the artifact's own content, so other keys stay as they were
    art_dir = art_dir / art_dir.norm()
    head_dim = query.out_features // num_heads
    direction = torch.zeros(query.out_features)
    direction[:head_dim] = 1.0 / head_dim**0.5  # (D,), inside head 0
    cls_proj = (normed[:, 0] @ cls_dir).mean()
    art_proj = (normed[:, -artifacts.shape[1] :][artifacts] @ art_dir).mean()
    # A small change of the keys (an artifact's key moves by about one typical key norm, other keys barely, so
    # similarities between keys stay as they were) and a large one of the CLS query.
    key_gain = key(normed).norm(dim=-1).median() / art_proj
    query_gain = logit * head_dim**0.5 / (key_gain * cls_proj * art_proj)
    query.weight += query_gain * torch.outer(direction, cls_dir)
    key.weight += key_gain * torch.outer(direction, art_dir)

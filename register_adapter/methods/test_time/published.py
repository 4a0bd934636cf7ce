"""Register neurons published with the paper's code, by model: ``add_test_time_registers(model)`` looks them up.

Jiang et al. (https://arxiv.org/abs/2506.08010) released one list, for DINOv2 ViT-L/14, in
``dinov2/dinov2/hub/register_neurons.py`` of https://github.com/nickjiang2378/test-time-registers (hooked at
``blocks[l].mlp.act``, the 4096-wide post-GELU hidden activation). transformers' ``Dinov2Model`` has the same block
order and unit order (``encoder.layer[l].mlp.fc2`` takes that activation), so the indices carry over to
``facebook/dinov2-large`` as they are.

A model is matched by its Hub id (``config._name_or_path``), else by the shape of its vision tower (family, blocks,
hidden size, MLP width, patch size: a copy in a local folder or under another name), or by the name given.

>>> from register_adapter.methods.test_time.published import PUBLISHED
>>> len(PUBLISHED["facebook/dinov2-large"].neurons)
45
>>> PUBLISHED["facebook/dinov2-large"].shape
TowerShape(family='dinov2', num_blocks=24, hidden_size=1024, mlp_width=4096, patch_size=14)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ...architectures import VisionTower
from ...errors import AdapterMismatchError, InvalidConfigError
from ...tuner.neurons import mlp_width


@dataclass(frozen=True)
class TowerShape:
    """What register neuron indices depend on: the family (block and unit order), the depth, the widths, the patch
    size. Two towers of one shape take the same ``(block, unit)`` pairs."""

    family: str
    num_blocks: int
    hidden_size: int
    mlp_width: int
    patch_size: int

    @classmethod
    def of(cls, tower: VisionTower) -> TowerShape:
        blocks = tower.blocks
        width = mlp_width(tower, blocks[0])
        return cls(tower.spec.name, len(blocks), tower.hidden_size, width, tower.patch_size)

    def __str__(self) -> str:
        return (
            f"{self.family}, {self.num_blocks} blocks, hidden size {self.hidden_size}, MLP width {self.mlp_width}, "
            f"patch size {self.patch_size}"
        )


@dataclass(frozen=True)
class PublishedNeurons:
    """Register neurons of one model, as published.

    Attributes:
        model: The Hub id of the model they were found for.
        neurons: ``(block, unit)`` pairs, in the published order (by block, as listed).
        source: Where they come from and how they were found, in one sentence.
        shape: The shape of that model's vision tower.
    """

    model: str
    neurons: tuple[tuple[int, int], ...]
    source: str
    shape: TowerShape


def _by_block(table: dict[int, list[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((block, unit) for block, units in table.items() for unit in units)


PUBLISHED: dict[str, PublishedNeurons] = {
    "facebook/dinov2-large": PublishedNeurons(
        model="facebook/dinov2-large",
        neurons=_by_block(
            {
                17: [884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844, 944, 464],
                16: [2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465],
                15: [1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625],
                14: [2110, 1510, 1082, 2711, 2464, 147, 543, 581],
                13: [2400],
                12: [3168],
            }
        ),
        source=(
            "published with the paper's code (github.com/nickjiang2378/test-time-registers, "
            "dinov2/dinov2/hub/register_neurons.py): found on ImageNet images with norm threshold 150 at the output "
            "of block 22, blocks 0-17"
        ),
        shape=TowerShape("dinov2", num_blocks=24, hidden_size=1024, mlp_width=4096, patch_size=14),
    ),
}


def find_published(tower: VisionTower, name: str | None = None) -> PublishedNeurons:
    """The published neurons for ``tower``'s model: those of ``name`` when given, else those of its Hub id, else
    those of the one published model of the same :class:`TowerShape` (with a warning: the neurons fit, but they were
    found for that model's weights).

    Raises:
        InvalidConfigError: ``name`` is not in :data:`PUBLISHED`, or nothing matches (the message says how to find
            the neurons).
        AdapterMismatchError: ``name``'s model has another shape than ``tower``.
    """
    shape = TowerShape.of(tower)
    if name is not None:
        if name not in PUBLISHED:
            raise InvalidConfigError(
                f"No register neurons are published for {name!r}; they are published for {', '.join(PUBLISHED)}."
            )
        if PUBLISHED[name].shape != shape:
            raise AdapterMismatchError(
                f"The register neurons published for {name} fit its shape ({PUBLISHED[name].shape}), not this "
                f"{type(tower.root).__name__} ({shape}). Find this model's own: "
                "register_adapter.find_register_neurons(model, images)."
            )
        return PUBLISHED[name]
    hub_id = str(getattr(tower.root.config, "_name_or_path", "") or "")
    if hub_id in PUBLISHED:
        return PUBLISHED[hub_id]
    same = [published for published in PUBLISHED.values() if published.shape == shape]
    if len(same) == 1:
        warnings.warn(
            f"Using the register neurons published for {same[0].model}: this model ({hub_id or 'no Hub id'}) has its "
            f"shape ({shape}). They fit a copy of its weights; for fine-tuned weights find the model's own with "
            "register_adapter.find_register_neurons(model, images).",
            stacklevel=3,
        )
        return same[0]
    raise InvalidConfigError(
        f"No published register neurons for {hub_id or 'this model'!r} ({type(tower.root).__name__}: {shape}); they "
        f"are published for {', '.join(f'{p.model} ({p.shape})' for p in PUBLISHED.values())}. Find them on a few "
        "hundred of your images: neurons = register_adapter.find_register_neurons(model, images), then "
        "add_test_time_registers(model, neurons)."
    )

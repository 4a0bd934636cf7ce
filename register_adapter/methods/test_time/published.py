"""Register neurons published with the paper's code, by model: ``add_test_time_registers(model)`` looks them up.

Jiang et al. (https://arxiv.org/abs/2506.08010) released one list, for DINOv2 ViT-L/14, in
``dinov2/dinov2/hub/register_neurons.py`` of https://github.com/nickjiang2378/test-time-registers (hooked at
``blocks[l].mlp.act``, the 4096-wide post-GELU hidden activation). transformers' ``Dinov2Model`` has the same block
order and unit order (``encoder.layer[l].mlp.fc2`` takes that activation), so the indices carry over to
``facebook/dinov2-large`` as they are.

>>> from register_adapter.methods.test_time.published import PUBLISHED
>>> len(PUBLISHED["facebook/dinov2-large"].neurons)
45
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedNeurons:
    """Register neurons of one model, as published.

    Attributes:
        model: The Hub id of the model they were found for.
        neurons: ``(block, unit)`` pairs, in the published order (by block, as listed).
        source: Where they come from and how they were found, in one sentence.
    """

    model: str
    neurons: tuple[tuple[int, int], ...]
    source: str


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
    ),
}

"""How far a plain ``Dinov2*`` base with registers is from transformers' native ``Dinov2WithRegisters*`` model.

The two differ in one place: the native model interpolates position embeddings with ``antialias=True``, plain
``Dinov2*`` models without. ``from_dinov2_with_registers(native, antialias=False)`` (and ``to_dinov2_with_registers``
of an adapter made on a plain ``Dinov2*`` model) therefore agree exactly at ``config.image_size`` and differ at every
other size. This prints the max abs difference of the pooler output, of ``last_hidden_state`` (CLS and patches) and of
the Backbone's last feature map, for the tiny test config and a DINOv2 ViT-S/14-sized config (random weights, random
registers, no downloads), next to the largest value of each output.

    python benchmarks/antialias_difference.py
"""

from __future__ import annotations

import torch
import transformers

from register_adapter import find_vision_tower, from_dinov2_with_registers

CONFIGS = {
    "tiny (30 px, 2 px patches)": (
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37},
        30,
        2,
        [(30, 30), (44, 44), (30, 46), (33, 71)],
    ),
    "ViT-S/14 (518 px)": (
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
        518,
        14,
        [(518, 518), (224, 224), (280, 280), (224, 336)],
    ),
}
OUTPUTS = (  # (native class, output, what is compared)
    ("Dinov2WithRegistersModel", "pooler_output", "pooler output"),
    ("Dinov2WithRegistersModel", "last_hidden_state", "last_hidden_state"),
    ("Dinov2WithRegistersBackbone", "feature_maps", "Backbone feature map"),
)


def compare(sizes: dict, image_size: int, patch_size: int, native_class: str, output: str, size: tuple[int, int]):
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(
        **sizes, image_size=image_size, patch_size=patch_size, num_register_tokens=4
    )
    if native_class.endswith("Backbone"):
        config.out_features = [f"stage{config.num_hidden_layers}"]
    native = getattr(transformers, native_class)(config).eval()
    torch.nn.init.normal_(find_vision_tower(native).embeddings.register_tokens)
    model = from_dinov2_with_registers(native, antialias=False).eval()
    pixel_values = torch.rand(1, 3, *size)
    with torch.no_grad():
        expected, got = native(pixel_values)[output], model(pixel_values=pixel_values)[output]
    if output == "feature_maps":
        expected, got = expected[-1], got[-1]
    if output == "last_hidden_state":  # the native model keeps its registers there
        expected = torch.cat([expected[:, :1], expected[:, 1 + config.num_register_tokens :]], dim=1)
    return float((expected - got).abs().max()), float(expected.abs().max())


def main() -> None:
    print("| config | output | size | max abs difference | largest value |")
    print("|---|---|---|---|---|")
    for label, (sizes, image_size, patch_size, sizes_to_try) in CONFIGS.items():
        for native_class, output, what in OUTPUTS:
            for size in sizes_to_try:
                difference, largest = compare(sizes, image_size, patch_size, native_class, output, size)
                print(f"| {label} | {what} | {size[0]}x{size[1]} | {difference:.2g} | {largest:.2g} |")


if __name__ == "__main__":
    main()

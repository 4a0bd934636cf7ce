"""``register-adapter demo``: add registers to a model, train them a few steps on real photos, save, reload.

Runs offline: the default model is built from a config, and the photos are scikit-image's sample images.

    register-adapter demo                                   # built-in tiny ViT
    register-adapter demo --model facebook/dinov2-small    # any supported model (local path or cached Hub id)
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from .architectures import find_vision_tower
from .model import add_registers
from .tokens import split_tokens

logger = logging.getLogger("register_adapter.demo")

SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
DEMO_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 64,
    "patch_size": 8,
}


def sample_images() -> tuple[list[np.ndarray], list[str]]:
    """Six RGB photos shipped with scikit-image, and their names (the demo's class labels)."""
    import skimage.data

    return [getattr(skimage.data, name)() for name in SAMPLE_IMAGES], list(SAMPLE_IMAGES)


def load_model(name: str | None, num_labels: int) -> tuple[torch.nn.Module, int]:
    """The model to adapt, and the image size it expects."""
    import transformers

    if name is None:
        config = transformers.ViTConfig(**DEMO_CONFIG, num_labels=num_labels)
        torch.manual_seed(0)
        return transformers.ViTForImageClassification(config), DEMO_CONFIG["image_size"]
    model = transformers.AutoModelForImageClassification.from_pretrained(
        name, num_labels=num_labels, ignore_mismatched_sizes=True
    )
    tower = find_vision_tower(model)
    size = getattr(tower.config, "image_size", 224)
    return model, int(size[0] if isinstance(size, (tuple, list)) else size)


def augment(image: np.ndarray, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (50-100% of the shorter side) and horizontal flip, to a (3, size, size) tensor in [-1, 1]."""
    from PIL import Image

    height, width = image.shape[:2]
    side = int(min(height, width) * (0.5 + 0.5 * torch.rand(1, generator=generator).item()))
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W)
    if torch.rand(1, generator=generator).item() < 0.5:
        pixels = pixels.flip(-1)
    return pixels


def run(
    model_name: str | None = None, steps: int = 30, num_register_tokens: int = 4, out: str | None = None, seed: int = 0
) -> dict[str, float]:
    """Run the demo and return its numbers (loss before/after, accuracy, reload difference)."""
    images, labels = sample_images()
    model, size = load_model(model_name, num_labels=len(labels))
    head = "classifier"
    model = add_registers(model, num_register_tokens, modules_to_save=[head], init="scaled_randn")
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(len(images))
    evaluation = torch.stack([augment(image, size, torch.Generator().manual_seed(1)) for image in images])

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(pixel_values=evaluation).logits
        model.train()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return float(loss), float((logits.argmax(-1) == targets).float().mean())

    loss_before, accuracy_before = evaluate()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    registers = find_vision_tower(model).embeddings.register_tokens["default"]
    start = registers.detach().clone()
    model.train()
    for _ in tqdm(range(steps), desc="training registers + head"):
        batch = torch.stack([augment(image, size, generator) for image in images])
        loss = torch.nn.functional.cross_entropy(model(pixel_values=batch).logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_after, accuracy_after = evaluate()
    registers_moved = float((registers.detach() - start).norm())

    out = out or tempfile.mkdtemp(prefix="register-adapter-demo-")
    model.save_pretrained(out)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_model(model_name, num_labels=len(labels))[0], out).eval()
    model.eval()
    with torch.no_grad():
        difference = float(
            (reloaded(pixel_values=evaluation).logits - model(pixel_values=evaluation).logits).abs().max()
        )
        hidden = model(pixel_values=evaluation[:1], output_hidden_states=True).hidden_states[-1]
    groups = split_tokens(hidden, model)
    trainable, total = model.get_nb_trainable_parameters()
    report = {
        "trainable_parameters": trainable,
        "all_parameters": total,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "register_change_norm": registers_moved,
        "reload_max_abs_diff": difference,
        "register_norm_last_layer": float(groups.registers.norm(dim=-1).mean()),
        "patch_norm_last_layer": float(groups.patches.norm(dim=-1).mean()),
    }
    lines = [
        f"model: {model_name or 'built-in ViT (64 px, 8 px patches, 4 layers)'} + {num_register_tokens} registers",
        f"trainable parameters: {trainable:,} of {total:,} (registers + new classifier head)",
        f"{steps} steps on {len(images)} scikit-image photos: loss {loss_before:.3f} -> {loss_after:.3f}, "
        f"accuracy {accuracy_before:.0%} -> {accuracy_after:.0%}",
        f"registers moved by {registers_moved:.3f} (L2); last-layer norms: registers "
        f"{report['register_norm_last_layer']:.2f}, patches {report['patch_norm_last_layer']:.2f}",
        f"saved to {out}: {', '.join(sorted(os.listdir(out)))}",
        f"reloaded with PeftModel.from_pretrained: max abs difference {difference:.1e}",
    ]
    for line in lines:
        logger.info(line)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="register-adapter demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Local path or cached Hub id; default: a built-in tiny ViT.")
    parser.add_argument("--steps", type=int, default=30, help="Training steps.")
    parser.add_argument("--num_register_tokens", type=int, default=4, help="Registers to add.")
    parser.add_argument("--out", default=None, help="Where to save the adapter; default: a temporary folder.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.model, args.steps, args.num_register_tokens, args.out)
    return 0 if report["reload_max_abs_diff"] == 0.0 else 1

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
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .. import loading
from ..architectures import find_vision_tower
from ..tokens import split_tokens
from ..training.augment import ImageClassificationTransform
from ..tuner import add_registers
from .options import check_out, non_negative, positive, report_errors

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


def load_model(name: str | None, labels: list[str]) -> tuple[torch.nn.Module, Any]:
    """The classifier to adapt and its image processor: the built-in ViT, or ``name`` with a new head for ``labels``."""
    import transformers

    if name is not None:
        return loading.load_model(name, "classification", labels=labels)
    config = transformers.ViTConfig(**DEMO_CONFIG, num_labels=len(labels))
    torch.manual_seed(0)
    size = DEMO_CONFIG["image_size"]
    processor = transformers.ViTImageProcessorPil(size={"height": size, "width": size})
    return transformers.ViTForImageClassification(config), processor


def run(
    model_name: str | None = None, steps: int = 30, num_register_tokens: int = 4, out: str | None = None, seed: int = 0
) -> dict[str, float]:
    """Run the demo and return its numbers (loss before/after, accuracy, reload difference)."""
    images, labels = sample_images()
    model, processor = load_model(model_name, labels)
    head = "classifier"
    model = add_registers(model, num_register_tokens, modules_to_save=[head], init="scaled_randn")
    photos = [PIL.Image.fromarray(image) for image in images]
    rows = {"image": photos, "label": list(range(len(photos))), "sample_id": list(range(len(photos)))}
    # The training augmentation of `register-adapter train`: a random resized crop and flip, new each step.
    augmentation = ImageClassificationTransform(processor, train=True, seed=seed)
    evaluation = ImageClassificationTransform(processor, train=False)(rows)["pixel_values"]
    targets = torch.arange(len(images))

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
    for step in tqdm(range(steps), desc="training registers + head"):
        augmentation.epoch = step
        batch = augmentation(rows)["pixel_values"]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=batch).logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_after, accuracy_after = evaluate()
    registers_moved = float((registers.detach() - start).norm())

    out = out or tempfile.mkdtemp(prefix="register-adapter-demo-")
    model.save_pretrained(out)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_model(model_name, labels)[0], out).eval()
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
    """``register-adapter demo``: returns an exit status, 2 for bad input (after one ``error:`` line on stderr) and 1
    when the reloaded adapter does not give the same outputs."""
    parser = argparse.ArgumentParser(prog="register-adapter demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Local path or cached Hub id; default: a built-in tiny ViT.")
    parser.add_argument("--steps", type=non_negative, default=30, help="Training steps.")
    parser.add_argument("--num_register_tokens", type=positive, default=4, help="Registers to add.")
    parser.add_argument("--out", default=None, help="Where to save the adapter; default: a temporary folder.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reports = []

    def demo(args: argparse.Namespace) -> None:
        if args.out is not None:
            check_out(Path(args.out))
        reports.append(run(args.model, args.steps, args.num_register_tokens, args.out))

    status = report_errors("demo", demo, args)
    return status or (0 if reports[0]["reload_max_abs_diff"] == 0.0 else 1)

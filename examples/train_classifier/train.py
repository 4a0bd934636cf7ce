"""Train registers and a classification head on a folder of labelled images, offline.

Without arguments the images are crops of scikit-image's sample photos (one class per photo) and the model is the
built-in tiny ViT, so the whole run takes about a minute on a laptop CPU and needs no download:

    python examples/train_classifier/train.py

With ``--images DIR`` the classes come from a folder of photos instead: either sub-folders (imagefolder layout) or,
for a flat folder, the file-name prefix before ``__`` (``skimage__astronaut.jpg`` is class ``skimage``). Every other
flag goes to ``register-adapter train`` unchanged, so a real model works the same way:

    python examples/train_classifier/train.py --images ../shared/data/images -- \\
        --model google/vit-base-patch16-224-in21k --lora_r 8 --num_train_epochs 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from peft import PeftModel

import register_adapter  # noqa: F401  (makes the REGISTERS adapter type known to peft)
from register_adapter.cli.demo import sample_images
from register_adapter.loading import load_model
from register_adapter.training.classification import parse_args, train


def crops_of(image: PIL.Image.Image, count: int, rng: np.random.Generator) -> list[PIL.Image.Image]:
    """``count`` random square crops covering 20-60 % of the shorter side each."""
    crops = []
    for _ in range(count):
        side = int(min(image.size) * rng.uniform(0.2, 0.6))
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, image.height - side + 1))
        crops.append(image.crop((left, top, left + side, top + side)).resize((64, 64)))
    return crops


def skimage_folder(root: Path, per_class: int) -> Path:
    """An imagefolder with one class per scikit-image sample photo, filled with crops of it."""
    rng = np.random.default_rng(0)
    for pixels, name in zip(*sample_images()):
        (root / name).mkdir(parents=True, exist_ok=True)
        photo = PIL.Image.fromarray(pixels).convert("RGB")
        for i, crop in enumerate(crops_of(photo, per_class, rng)):
            crop.save(root / name / f"{i:03d}.png")
    return root


def folder_from_photos(images: Path, root: Path, per_class: int) -> Path:
    """An imagefolder from the flat folder ``images``: classes by file-name prefix (``source__name.jpg``)."""
    rng = np.random.default_rng(0)
    by_class: dict[str, list[Path]] = {}
    for path in sorted(images.glob("*.*")):
        by_class.setdefault(path.name.split("__")[0], []).append(path)
    for name, paths in by_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k, path in enumerate(paths):
            with PIL.Image.open(path) as photo:
                for i, crop in enumerate(crops_of(photo.convert("RGB"), max(1, per_class // len(paths)), rng)):
                    crop.save(root / name / f"{k:03d}-{i:02d}.png")
    return root


def folder_or_prefix_classes(images: Path, data: Path) -> Path:
    """``images`` itself when it is in imagefolder layout, else the folder that :func:`folder_from_photos` writes."""
    return images if any(p.is_dir() for p in images.iterdir()) else data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="photos to classify (default: scikit-image samples)")
    parser.add_argument("--per_class", type=int, default=40, help="crops per class")
    parser.add_argument("--workdir", type=Path, default=Path("train_classifier_run"), help="data and outputs")
    parser.add_argument("train_args", nargs="*", help="flags for register-adapter train (after --)")
    args = parser.parse_args()

    data = args.workdir / "images"
    defaults = [
        "--model", "tiny-vit",
        "--num_register_tokens", "4",
        "--num_train_epochs", "8",
        "--per_device_train_batch_size", "16",
        "--learning_rate", "3e-3",
        "--train_val_split", "0.2",
        "--logging_steps", "10",
        "--report_to", "none",
    ]  # fmt: skip
    train_dir = data if args.images is None else folder_or_prefix_classes(args.images, data)
    argv = [*defaults, "--train_dir", str(train_dir), "--output_dir", str(args.workdir / "adapter"), *args.train_args]
    model_args, data_args, register_args, training_args = parse_args(argv)
    output_dir = Path(training_args.output_dir)  # a later --output_dir among the train_args wins

    # Under torchrun every process runs this script: the first one writes the images, the others wait for it.
    with training_args.main_process_first(desc="writing the example images"):
        if not data.exists():
            if args.images is None:
                skimage_folder(data, args.per_class)
            elif train_dir == data:
                folder_from_photos(args.images, data, args.per_class)
    trainer = train(model_args, data_args, register_args, training_args)
    if not trainer.is_world_process_zero():
        return

    if trainer.eval_dataset is None:  # --train_val_split 0 and no validation images: nothing was evaluated
        print(f"\nAdapter saved to {output_dir} (trained on all images, no validation split to evaluate on)")
        images = trainer.train_dataset
    else:
        results = json.loads((output_dir / "eval_results.json").read_text())
        print(f"\nBest adapter saved to {output_dir}: " + ", ".join(f"{k}={v:.3f}" for k, v in results.items()))
        images = trainer.eval_dataset

    # Anyone restores the adapter (registers + head) with PeftModel.from_pretrained: identical outputs.
    labels = list(trainer.model.config.id2label.values())
    device = trainer.model.device
    restored = PeftModel.from_pretrained(
        load_model(model_args.model, "classification", labels=labels)[0], output_dir
    ).to(device)
    pixels = images[:8]["pixel_values"].to(device)
    with torch.no_grad():
        same = torch.equal(
            restored.eval()(pixel_values=pixels).logits, trainer.model.eval()(pixel_values=pixels).logits
        )
    print(f"Restored with PeftModel.from_pretrained, identical logits: {same}")


if __name__ == "__main__":
    main()

"""``register-adapter find-neurons``: find a model's register neurons on unlabelled images and save (or push) the
test-time register adapter that moves them onto a register token.

    register-adapter find-neurons --model facebook/dinov2-large photos/ --out dinov2-large-tt-reg/
    register-adapter find-neurons --model facebook/dinov2-large photos/ --out out/ --threshold 150 \\
        --outlier_layer 22 --top_layer 17 --push_to_hub your-name/dinov2-large-test-time-registers
    register-adapter find-neurons --model planted:dinov2 photos/ --out out/        # offline: planted artifacts

Writes the adapter into ``--out`` (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``: load it with
``PeftModel.from_pretrained(base, OUT)``), ``neurons.json`` (the neurons and their scores, the best candidates, the
settings and why they were chosen, and the outlier fraction of every block output before and after the edit, as
:meth:`~register_adapter.RegisterNeurons.to_dict` gives it) and ``before_after.png`` (norm maps and outliers of the
first images without and with the test-time register). ``--push_to_hub`` uploads the adapter, its card and
``neurons.json`` in one commit. Bad input ends the run with exit status 2 and one ``error:`` line on stderr, before
any model is loaded where it can be known then. Also runs as ``python -m register_adapter.cli find-neurons``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..architectures import find_vision_tower
from ..diagnostics.artifacts import find_artifacts
from ..diagnostics.viz import before_after, display_image, save_png
from ..errors import InvalidConfigError
from ..loading import first_line, load_model
from ..methods.test_time import SCORES, add_test_time_registers, find_register_neurons
from ..pixels import as_pixel_values
from ..sources import find_image_files
from ..tuner.config import NEURON_MODES
from .diagnose import BEFORE_AFTER_IMAGES
from .options import check_out, positive, report_errors, threshold, whole_number

REPORT_NAME = "neurons.json"
PICTURE_NAME = "before_after.png"


def run(args: argparse.Namespace) -> list[Path]:
    """Find the neurons, write the adapter, neurons.json and before_after.png, push if asked; returns the files."""
    paths = find_image_files(args.images, check=True)
    out = Path(args.out)
    check_out(out)
    model, processor = load_model(args.model)
    model = model.to(args.device).eval()
    found = find_register_neurons(
        model,
        paths,
        outlier_layer=args.outlier_layer,
        threshold=args.threshold,
        top_layer=args.top_layer,
        top_k=args.top_k,
        score=args.score,
        mode=args.mode,
        num_register_tokens=args.num_register_tokens,
        keep_cls=args.keep_cls,
        batch_size=args.batch_size,
        processor=processor,
    )  # the edit the adapter makes: the outliers after it and the feature cosine are measured with it
    shown = paths[:BEFORE_AFTER_IMAGES]
    options = {
        "layer": found.outlier_layer + 1,
        "threshold": found.threshold.value,
        "sources": [str(p) for p in shown],
    }
    pixel_values = as_pixel_values(shown, find_vision_tower(model), processor)  # (n, 3, H, W)
    base = find_artifacts(model, pixel_values, **options)
    model = add_test_time_registers(model, found).eval()  # the edit found was measured with
    adapted = find_artifacts(model, pixel_values, **options)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidConfigError(f"Cannot write to --out '{out}': {first_line(error)}") from error
    model.save_pretrained(out)
    report = out / REPORT_NAME
    report.write_text(json.dumps({"model": args.model, **found.to_dict()}, indent=1) + "\n")
    images = [display_image(values, processor) for values in pixel_values]
    picture = save_png(
        before_after(base, adapted, images, labels=("base", "test-time register"), max_images=len(shown)),
        out / PICTURE_NAME,
    )
    if args.push_to_hub:
        url = model.push_to_hub(args.push_to_hub, extra_files=[report])
        sys.stdout.write(f"pushed to {url}\n")
    for name in ("threshold", "outlier_layer", "top_layer", "top_k"):
        sys.stdout.write(f"{name}: {found.reasons[name]}\n")
    before, after = found.outlier_fraction_before, found.outlier_fraction_after
    sys.stdout.write(
        f"{found.top_k} register neurons on {found.num_images} images; outlier patch tokens at block "
        f"{found.outlier_layer}: {100 * before[found.outlier_layer]:.2f} % -> {100 * after[found.outlier_layer]:.2f} "
        f"% with {found.num_register_tokens} register(s); feature cosine to the base model {found.feature_cosine:.4f}"
        f"\nwrote the adapter, {report.name} and {picture.name} to {out}\n"
    )
    return [out / "adapter_config.json", out / "adapter_model.safetensors", out / "README.md", report, picture]


def _block(value: str) -> int:
    block = whole_number(value)
    if block is None:
        raise argparse.ArgumentTypeError(f"must be a block index (0 = first block, -1 = last); got {value!r}.")
    return block


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="register-adapter find-neurons",
        description="Find the register neurons of a vision transformer on unlabelled images (arXiv 2506.08010) and "
        "save the training-free test-time register adapter that moves them onto a register token.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument(
        "--model",
        required=True,
        help="model path or Hub id, a built-in tiny model (tiny-vit, ...), or planted:<family> for a model with "
        "planted artifacts (vit, deit, dinov2, dinov2-with-registers, clip-vision, clip, siglip, ijepa)",
    )
    parser.add_argument("--out", required=True, help="output folder for the adapter, neurons.json and the PNG")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload the adapter to this Hub repository")
    parser.add_argument(
        "--threshold",
        type=threshold,
        default="auto",
        help="'auto' (bimodal split, default), a number (150 for DINOv2 ViT-L), or 'mean+<k>std'",
    )
    parser.add_argument(
        "--outlier_layer",
        type=_block,
        help="block (0 = first) whose output defines the outliers (default: the one with the most outliers)",
    )
    parser.add_argument(
        "--top_layer", type=_block, help="last block whose neurons are candidates (default: the first with outliers)"
    )
    parser.add_argument(
        "--top_k",
        type=positive,
        help="number of register neurons (default: the fewest that leave no outliers)",
    )
    parser.add_argument("--score", choices=list(SCORES), default="mean", help="mean (paper, default) or mean_abs")
    parser.add_argument("--num_register_tokens", type=positive, default=1, help="test-time registers (default 1)")
    parser.add_argument(
        "--mode", choices=list(NEURON_MODES), default="neuron_max", help="the edit (default neuron_max)"
    )
    parser.add_argument(
        "--keep_cls", action="store_true", help="keep the neurons' activation on CLS (public code; default: zero it)"
    )
    parser.add_argument("--batch_size", type=positive, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``register-adapter find-neurons``: returns an exit status (2 for bad input)."""
    return report_errors("find-neurons", run, parse_args(argv))

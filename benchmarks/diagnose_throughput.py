"""Throughput of ``find_artifacts`` against a plain forward pass of the same model.

``find_artifacts`` hooks every block output and keeps only the token norms, then builds the report (thresholds,
per-layer statistics, per-image maps). This measures what that costs: for a DINOv2 ViT-S/14 or ViT-B/14-sized
config (random weights, no downloads) at 224 px, it times

    (a) ``model(pixel_values=...)``                  a plain forward pass, batch by batch
    (b) ``find_artifacts(model, pixel_values)``      the same batches, with the hooks and the report

over ``--images`` images, in eval mode under ``torch.inference_mode``, after a warm-up, for ``--repeats``
repetitions whose order alternates (a, b), (b, a), ... so that drift hits both. It prints the median images/s of each
and the ratio of the median times; the target is ratio <= 1.15.

    python benchmarks/diagnose_throughput.py
    python benchmarks/diagnose_throughput.py --size B --images 32 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Dinov2Config, Dinov2Model

from register_adapter.diagnostics import find_artifacts

SIZES = {"S": (384, 6), "B": (768, 12)}  # hidden size, heads; 12 layers, 14 px patches
TARGET = 1.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="S")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    hidden, heads = SIZES[args.size]
    config = Dinov2Config(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=12, image_size=224, patch_size=14
    )
    torch.manual_seed(0)
    model = Dinov2Model(config).to(args.device).eval()
    pixel_values = torch.randn(args.images, 3, 224, 224, device=args.device)

    def plain() -> None:
        for batch in pixel_values.split(args.batch_size):
            model(pixel_values=batch)

    def diagnose() -> None:
        find_artifacts(model, pixel_values, batch_size=args.batch_size)

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain forward": [], "find_artifacts": []}
    with torch.inference_mode():
        plain(), diagnose()  # warm-up
        for repeat in range(args.repeats):
            order = [("plain forward", plain), ("find_artifacts", diagnose)]
            for name, fn in order if repeat % 2 == 0 else reversed(order):
                times[name].append(timed(fn))

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"DINOv2 ViT-{args.size}/14, 224 px, {args.images} images in batches of {args.batch_size}, "
        f"{args.repeats} repeats, {torch.get_num_threads()} threads, device {args.device}"
    )
    for name, seconds in medians.items():
        print(f"  {name:<15} {args.images / seconds:8.2f} images/s   (median {seconds:.3f} s)")
    ratio = medians["find_artifacts"] / medians["plain forward"]
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"time ratio find_artifacts / plain forward = {ratio:.3f} (target <= {TARGET}): {verdict}")


if __name__ == "__main__":
    main()

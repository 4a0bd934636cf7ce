"""Cost of training-free test-time registers (arXiv 2506.08010): the forward pass with one, and the neuron search.

1. Inference. For a DINOv2 ViT-S/14, ViT-B/14 or ViT-L/14-sized config (random weights, no downloads) at 224 px,
   this times the forward pass of

       (a) ``Dinov2Model``                               the base, 1 + 256 tokens
       (b) ``add_registers(Dinov2Model, 1)``             one plain register: the cost of the extra token alone
       (c) ``add_test_time_registers(Dinov2Model)``      one test-time register and 45 register neurons

   ViT-L uses the 45 neurons published for ``facebook/dinov2-large`` (blocks 12-17); the smaller sizes use 45 units
   drawn at random from the blocks at the same relative depths. Before timing, ``disable_adapter()`` on (c) must
   give (a) exactly. The variants run in an order rotated every repetition; ratios are medians of the
   per-repetition ratios, with their interquartile range. Target: c / a <= token ratio (257 + 1) / 257 + 0.05.

2. Search. On a DINOv2 ViT-S/14-sized model with planted artifacts (``make_artifact_model``, 224 px, 14 px patches,
   12 blocks) and ``--images`` synthetic scenes, this times a plain forward pass over the images against
   ``find_register_neurons`` with every setting chosen automatically, and with ``outlier_layer``, ``top_layer`` and
   ``top_k`` given; it prints the seconds per 100 images, the ratio to the plain forward (medians over
   ``--search-repeats`` repetitions in rotated order) and the forward passes each made (the search streams the
   images several times, see :mod:`register_adapter.methods.test_time.search`).

The script always exits 0 (it is a report).

    python benchmarks/test_time_overhead.py                       # ViT-S, then the search on 100 images
    python benchmarks/test_time_overhead.py --sizes S L --repeats 5
    python benchmarks/test_time_overhead.py --device cuda --batch-size 64 --images 1000
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import time

import torch
from transformers import Dinov2Config, Dinov2Model

from register_adapter import add_registers, add_test_time_registers, find_register_neurons
from register_adapter.methods.test_time import PUBLISHED
from register_adapter.testing import make_artifact_model, make_object_images
from register_adapter.tuner.neurons import move_to_registers

IMAGE_SIZE = 224
PATCH_SIZE = 14
EXTRA = 0.05  # c / a may exceed the token ratio by this much
SIZES = {"S": ("ViT-S/14", 384, 12, 6), "B": ("ViT-B/14", 768, 12, 12), "L": ("ViT-L/14", 1024, 24, 16)}
LARGE = PUBLISHED["facebook/dinov2-large"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=["S"], help="model sizes to time")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=100, help="images of the search benchmark (0 to skip it)")
    parser.add_argument("--search-repeats", type=int, default=3, help="timed repetitions of the search benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _paired(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0], 0, ratios[0])
    return statistics.median(ratios), q1, q3


def _environment(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def neurons_for(size: str, num_layers: int, width: int) -> list[tuple[int, int]]:
    """The published ViT-L neurons, or as many random units at the same relative depths of a smaller model."""
    if size == "L":
        return list(LARGE.neurons)
    rng = random.Random(0)
    blocks = sorted({round(block * num_layers / 24) for block, _ in LARGE.neurons})
    return [(rng.choice(blocks), unit) for unit in rng.sample(range(width), len(LARGE.neurons))]


def time_inference(size: str, args: argparse.Namespace, device: torch.device) -> None:
    name, hidden, layers, heads = SIZES[size]
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    base = Dinov2Model(config).eval()
    neurons = neurons_for(size, layers, 4 * hidden)
    models = {
        "a": base.to(device),
        "b": add_registers(copy.deepcopy(base), 1).to(device).eval(),
        "c": add_test_time_registers(copy.deepcopy(base), neurons).to(device).eval(),
    }
    pixel_values = torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)  # (B, 3, H, W)
    with torch.inference_mode():
        with models["c"].disable_adapter():
            disabled = models["c"](pixel_values=pixel_values).last_hidden_state
        if not torch.equal(disabled, models["a"](pixel_values=pixel_values).last_hidden_state):
            raise RuntimeError("disable_adapter() does not give the base model: the timings would mean nothing.")
        times: dict[str, list[float]] = {key: [] for key in models}
        keys = list(models)
        for rep in range(args.warmup + args.repeats):
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                seconds = _timed(lambda key=key: models[key](pixel_values=pixel_values), device)
                if rep >= args.warmup:
                    times[key].append(1e3 * seconds)
    tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
    target = (tokens + 1) / tokens + EXTRA
    c_over_a, q1, q3 = _paired(times["c"], times["a"])
    b_over_a, _, _ = _paired(times["b"], times["a"])
    c_over_b, _, _ = _paired(times["c"], times["b"])
    print(
        f"\n{name}, {len(neurons)} register neurons in blocks {sorted({b for b, _ in neurons})} | batch "
        f"{args.batch_size}, {IMAGE_SIZE} px, float32, sdpa, {_environment(device)}, median of {args.repeats}"
    )
    labels = {"a": "Dinov2Model", "b": "+ 1 plain register", "c": "+ 1 test-time register"}
    for key, label in labels.items():
        print(f"  ({key}) {label:<26}{statistics.median(times[key]):>10.1f} ms")
    print(
        f"  c / a = {c_over_a:.3f} (IQR {q1:.3f}-{q3:.3f}), target <= {target:.3f}: {'PASS' if c_over_a <= target else 'FAIL'}"
    )
    print(f"  b / a = {b_over_a:.3f} (the extra token), c / b = {c_over_b:.3f} (the neuron edit)")
    edit, projection = time_edit(models["a"], neurons, args, device)
    blocks = len({b for b, _ in neurons})
    share = 100 * blocks * edit / statistics.median(times["a"])
    print(
        f"  the edit alone: {edit:.2f} ms per hooked block ({100 * edit / projection:.1f} % of that block's MLP output "
        f"projection, {projection:.1f} ms); {blocks} hooked blocks = {share:.2f} % of (a)"
    )


def time_edit(
    base: Dinov2Model, neurons: list[tuple[int, int]], args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """Median milliseconds of the edit of the block with the most register neurons, and of that block's MLP output
    projection, on one batch of MLP activations (paired repetitions: small ops on a shared machine are noisy)."""
    block = max({b for b, _ in neurons}, key=lambda b: sum(n == b for n, _ in neurons))
    projection = base.encoder.layer[block].mlp.fc2
    tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 2  # CLS, the register, the patches
    hidden = torch.randn(args.batch_size, tokens, projection.in_features, device=device)  # (B, S, I)
    units = torch.tensor([u for b, u in neurons if b == block], device=device)
    positions = torch.ones_like(units)
    edits, projections = [], []
    with torch.inference_mode():
        for rep in range(5 * (args.warmup + args.repeats)):
            edit = _timed(lambda: move_to_registers(hidden, units, positions, mode="neuron_max", num_kept=0), device)
            full = _timed(lambda: projection(hidden), device)
            if rep >= 5 * args.warmup:
                edits.append(1e3 * edit)
                projections.append(1e3 * full)
    return statistics.median(edits), statistics.median(projections)


def time_search(args: argparse.Namespace, device: torch.device) -> None:
    planted = make_artifact_model(
        "dinov2", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=384, num_layers=12, num_heads=6
    )
    model = planted.model.to(device)
    pixel_values = planted.preprocess(make_object_images(args.images, IMAGE_SIZE, seed=1).images).to(device)
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    handle = model.register_forward_pre_hook(count)

    def plain() -> None:
        with torch.inference_mode():
            for batch in pixel_values.split(args.batch_size):
                model(pixel_values=batch)

    settings = {"batch_size": args.batch_size, "progress": False}
    found = find_register_neurons(model, pixel_values[: args.batch_size], **settings)  # warm-up, and the settings
    given = {"outlier_layer": found.outlier_layer, "top_layer": found.top_layer, "top_k": found.top_k}
    runs = {
        "plain forward": plain,
        "find_register_neurons, automatic": lambda: find_register_neurons(model, pixel_values, **settings),
        "find_register_neurons, settings given": lambda: find_register_neurons(
            model, pixel_values, **settings, **given
        ),
    }
    plain()
    print(
        f"\nsearch: planted DINOv2 ViT-S/14 (12 blocks, register neurons "
        f"{[(layer - 1, unit) for layer, unit in planted.neurons]}), {args.images} scenes, batch {args.batch_size}, "
        f"{_environment(device)}, median of {args.search_repeats}"
    )
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    passes: dict[str, float] = {}
    names = list(runs)
    batches = math.ceil(args.images / args.batch_size)
    for rep in range(args.search_repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            calls = 0
            seconds[name].append(_timed(runs[name], device))
            passes[name] = calls / batches
    for name in names:
        ratio, q1, q3 = _paired(seconds[name], seconds["plain forward"])
        print(
            f"  {name:<40}{100 * statistics.median(seconds[name]) / args.images:>8.2f} s per 100 images   "
            f"{ratio:5.2f} x plain (IQR {q1:.2f}-{q3:.2f})   {passes[name]:.1f} passes"
        )
    handle.remove()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    for size in args.sizes:
        time_inference(size, args, device)
    if args.images:
        time_search(args, device)


if __name__ == "__main__":
    main()

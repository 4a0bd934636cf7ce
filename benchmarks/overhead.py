"""Inference overhead of register tokens added by ``add_registers``, against the native implementation.

For DINOv2 ViT-S/14, ViT-B/14 and ViT-L/14-sized configs (random weights, no downloads) at 224 px, this times the
forward pass of three variants that share the same base weights:

    (a) ``Dinov2Model``                         the base, 1 + 256 tokens
    (b) ``add_registers(Dinov2Model, 4)``       our adapter, 1 + 4 + 256 tokens (registers stripped at the end)
    (c) ``Dinov2WithRegistersModel(4)``         transformers' native registers, holding the same 4 registers as (b)

Before timing, (b) and (c) must agree in float32 (max abs diff on ``pooler_output`` and on the CLS + patch tokens
of ``last_hidden_state`` <= 1e-4), which proves the comparison is like with like; a mismatch raises. The registers
are random (not the adapter's near-zero init), so agreement cannot come from registers that do nothing.

Timing: eval mode, ``torch.inference_mode``, warm-up passes first, then ``--repeats`` repetitions in which the three
variants run one forward each, in an order rotated every repetition so drift hits all of them equally; the table
shows the median (CUDA is synchronized around every timed forward). Ratios are medians of the per-repetition ratios,
with their interquartile range: the variants of one repetition run back to back, so slow drift of a shared machine
cancels out of them. FLOPs are counted per image with
``torch.utils.flop_counter.FlopCounterMode`` (the CPU flash-attention kernel behind SDPA is not in its registry, so
it is counted with the formula torch uses for the CUDA kernels).

Targets, each reported as PASS/FAIL:

    b / c time ratio  <= 1.02                          the adapter costs no more than native registers
    time overhead of b over a  <= FLOP overhead + 2 points   the cost is the extra tokens, not the wrapping

The script always exits 0 (it is a report); the last line summarizes the targets.

Run (with the defaults, S and B take about 4 minutes on an idle 2-core CPU and up to 11 on a busy one; L takes
about 10 minutes on its own with ``--repeats 5 --warmup 1``)::

    python benchmarks/overhead.py                       # S, B, L
    python benchmarks/overhead.py --sizes S B
    python benchmarks/overhead.py --sizes L --repeats 5
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from register_adapter import add_registers

NUM_REGISTERS = 4
IMAGE_SIZE = 224
PATCH_SIZE = 14
TOLERANCE = 1e-4
MAX_TIME_RATIO = 1.02  # b / c
MAX_EXTRA_POINTS = 2.0  # time overhead of b over a may exceed its FLOP overhead by this many percentage points


@dataclass(frozen=True)
class Size:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int


SIZES = {
    "S": Size("ViT-S/14", 384, 12, 6),
    "B": Size("ViT-B/14", 768, 12, 12),
    "L": Size("ViT-L/14", 1024, 24, 16),
}

VARIANTS = {
    "a": "Dinov2Model",
    "b": f"Dinov2Model + add_registers({NUM_REGISTERS})",
    "c": f"Dinov2WithRegistersModel({NUM_REGISTERS})",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="model sizes to run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_models(size: Size, attn: str, device: torch.device) -> dict[str, nn.Module]:
    """The three variants in float32, eval mode, with identical base weights and (b) and (c) sharing registers."""
    common = {
        "hidden_size": size.hidden_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "mlp_ratio": 4,
        "patch_size": PATCH_SIZE,
        "image_size": IMAGE_SIZE,
        "attn_implementation": attn,
    }
    base = Dinov2Model(Dinov2Config(**common))
    state = base.state_dict()

    adapted_base = Dinov2Model(Dinov2Config(**common))
    adapted_base.load_state_dict(state, strict=True)
    adapted = add_registers(adapted_base, num_register_tokens=NUM_REGISTERS)
    registers = adapted.base_model.model.embeddings.register_tokens["default"]  # (1, R, D)
    with torch.no_grad():
        registers.normal_(std=0.02)

    native = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**common, num_register_tokens=NUM_REGISTERS))
    native.load_state_dict({**state, "embeddings.register_tokens": registers.detach().clone()}, strict=True)

    return {"a": base.to(device).eval(), "b": adapted.to(device).eval(), "c": native.to(device).eval()}


def check_agreement(models: dict[str, nn.Module], pixel_values: torch.Tensor) -> tuple[float, float]:
    """Max abs diff between (b) and (c) on ``pooler_output`` and on ``last_hidden_state`` without the registers."""
    with torch.inference_mode():
        ours = models["b"](pixel_values=pixel_values)
        native = models["c"](pixel_values=pixel_values)
    native_tokens = torch.cat(
        [native.last_hidden_state[:, :1], native.last_hidden_state[:, 1 + NUM_REGISTERS :]], dim=1
    )  # (B, 1 + N, D): CLS and patches, as (b) returns them
    pooler_diff = (ours.pooler_output - native.pooler_output).abs().max().item()
    tokens_diff = (ours.last_hidden_state - native_tokens).abs().max().item()
    if not max(pooler_diff, tokens_diff) <= TOLERANCE:
        raise RuntimeError(
            f"add_registers and Dinov2WithRegistersModel disagree (pooler_output {pooler_diff:.2e}, "
            f"last_hidden_state {tokens_diff:.2e}, tolerance {TOLERANCE:.0e}): the timings would not compare like "
            "with like."
        )
    return pooler_diff, tokens_diff


def _flash_attention_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * q_len * k_len * (head_dim + v_dim)  # Q @ K^T and P @ V


def count_flops(model: nn.Module, pixel_values: torch.Tensor) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_attention_cpu_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(pixel_values=pixel_values)
    return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    models: dict[str, nn.Module], pixel_values: torch.Tensor, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Milliseconds per forward for each variant; repetitions interleave the variants in a rotating order."""
    device = pixel_values.device
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for rep in range(warmup + repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                _synchronize(device)
                start = time.perf_counter()
                models[name](pixel_values=pixel_values)
                _synchronize(device)
                if rep >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and interquartile range of the per-repetition ratios ``numerator[i] / denominator[i]``."""
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    if len(ratios) < 2:
        return ratios[0], (ratios[0], ratios[0])
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (q1, q3)


def _cpu_note() -> str:
    # Other processes on the machine distort CPU timings; the load average tells the reader how much to trust them.
    load = os.getloadavg()[0]
    return f", {torch.get_num_threads()} threads, load avg {load:.1f} on {os.cpu_count()} cores"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_size(size: Size, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Benchmark one size, print its table, and return the failed targets (empty when both pass)."""
    torch.manual_seed(args.seed)
    models = build_models(size, args.attn, device)
    pixel_values = torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)  # (B, 3, H, W)
    pooler_diff, tokens_diff = check_agreement(models, pixel_values)

    models = {name: model.to(dtype) for name, model in models.items()}
    pixel_values = pixel_values.to(dtype)
    flops = {name: count_flops(model, pixel_values[:1]) for name, model in models.items()}
    times = time_variants(models, pixel_values, args.warmup, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}

    # Ratios are taken within each repetition, where the variants ran back to back, then the median is reported:
    # drift of a shared machine between repetitions cancels out. The interquartile range shows what is left of noise.
    ratio, ratio_iqr = paired_ratio(times["b"], times["c"])
    b_over_a, b_over_a_iqr = paired_ratio(times["b"], times["a"])
    c_over_a, _ = paired_ratio(times["c"], times["a"])
    time_overhead = 100 * (b_over_a - 1)
    flop_overhead = 100 * (flops["b"] / flops["a"] - 1)
    ratio_ok = ratio <= MAX_TIME_RATIO
    overhead_ok = time_overhead <= flop_overhead + MAX_EXTRA_POINTS

    print(
        f"\n{size.name}  hidden {size.hidden_size}, {size.num_hidden_layers} layers, {size.num_attention_heads} heads"
        f"  |  batch {args.batch_size}, {IMAGE_SIZE} px, {args.dtype}, {args.attn}, {device.type}"
        f"{_cpu_note() if device.type == 'cpu' else ''}, median of {args.repeats} (after {args.warmup} warm-up)"
    )
    print(
        f"check (b) vs (c), float32: max abs diff pooler_output {pooler_diff:.1e}, "
        f"last_hidden_state {tokens_diff:.1e} (<= {TOLERANCE:.0e}) OK"
    )
    print(f"  {'variant':<44}{'ms median':>10}{'min':>9}{'max':>9}{'GFLOPs/img':>12}")
    for name, label in VARIANTS.items():
        print(
            f"  ({name}) {label:<40}{median[name]:>10.1f}{min(times[name]):>9.1f}{max(times[name]):>9.1f}"
            f"{flops[name] / 1e9:>12.3f}"
        )
    native_overhead = 100 * (c_over_a - 1)
    iqr = f"(IQR {ratio_iqr[0]:.3f}-{ratio_iqr[1]:.3f})"
    print(f"  b / c time ratio        {ratio:6.3f} {iqr}  target <= {MAX_TIME_RATIO:.2f}{'':<8}{_verdict(ratio_ok)}")
    print(
        f"  b over a: time {time_overhead:+5.2f} % (IQR {100 * (b_over_a_iqr[0] - 1):+.1f} to "
        f"{100 * (b_over_a_iqr[1] - 1):+.1f})  FLOPs {flop_overhead:+5.2f} %   target time <= FLOPs "
        f"+ {MAX_EXTRA_POINTS:.0f} pts   {_verdict(overhead_ok)}"
    )
    print(f"  (c over a, for reference: time {native_overhead:+5.2f} %)")

    failed = []
    if not ratio_ok:
        failed.append(f"{size.name} b/c {ratio:.3f} > {MAX_TIME_RATIO:.2f}")
    if not overhead_ok:
        failed.append(f"{size.name} overhead {time_overhead:+.2f} % > FLOPs {flop_overhead:+.2f} % + 2")
    return failed


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    failed = []
    for key in args.sizes:
        failed += run_size(SIZES[key], args, device, dtype)
    total = 2 * len(args.sizes)
    sizes = " ".join(args.sizes)
    if failed:
        print(f"\nSUMMARY: {total - len(failed)}/{total} targets PASS for sizes {sizes}; FAIL: {'; '.join(failed)}")
    else:
        print(f"\nSUMMARY: {total}/{total} targets PASS for sizes {sizes}")


if __name__ == "__main__":
    main()

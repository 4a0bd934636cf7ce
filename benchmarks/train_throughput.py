"""Training throughput and peak memory of (a) registers + head, (b) registers + head + LoRA, (c) full fine-tuning.

Same model, same batch, same optimizer (AdamW), measured in one run; each setup runs in a fresh process so that its
peak memory is its own. On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the growth of the
process's peak resident memory over what the model and data held before the first step.

    python benchmarks/train_throughput.py                      # ViT-S/16-sized model, random weights, CPU
    python benchmarks/train_throughput.py --device cuda --batch_size 64 --bf16
    python benchmarks/train_throughput.py --model google/vit-base-patch16-224-in21k --device cuda

Registers + head train a few thousand parameters: no gradients and no optimizer state for the frozen weights, so
they need less memory than full fine-tuning, which keeps gradients and two AdamW moments for every weight.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time

import torch

SETUPS = {
    "a": "registers + head",
    "b": "registers + head + LoRA",
    "c": "full fine-tuning",
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_model(name: str, num_labels: int) -> torch.nn.Module:
    """A random ViT-S/16 for ``vit-small``, else the model that ``register-adapter train --model name`` trains."""
    import transformers

    from register_adapter.loading import load_model

    if name == "vit-small":
        config = transformers.ViTConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=224,
            patch_size=16, num_labels=num_labels,
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.ViTForImageClassification(config)
    return load_model(name, "classification", labels=[f"class {i}" for i in range(num_labels)])[0]


def measure(setup: str, options: dict, results: multiprocessing.Queue) -> None:
    """Train ``options["steps"]`` steps of ``setup`` and put images/s and peak memory into ``results``."""
    from register_adapter import add_registers
    from register_adapter.training.classification import head_modules

    torch.set_num_threads(options["threads"])
    device = torch.device(options["device"])
    model = build_model(options["model"], options["num_labels"])
    config = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
    lora = {"lora_r": options["lora_r"]} if setup == "b" else {}
    model = add_registers(model, options["num_register_tokens"], modules_to_save=head_modules(model), **lora)
    if setup == "c":
        model.requires_grad_(True)
    model.to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    size = int(config.image_size)
    pixels = torch.randn(options["batch_size"], 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, options["num_labels"], (options["batch_size"],), generator=generator).to(device)
    dtype = torch.bfloat16 if options["bf16"] else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes()
    for _ in range(options["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(options["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    elapsed = time.perf_counter() - start
    results.put(
        {
            "setup": setup,
            "name": SETUPS[setup],
            "trainable_params": trainable,
            "images_per_s": options["steps"] * options["batch_size"] / elapsed,
            "peak_memory_mib": peak / 2**20,
            "training_memory_mib": (peak - baseline) / 2**20,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-small", help="vit-small (random ViT-S/16), a tiny-* name, or a Hub id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--num_labels", type=int, default=10)
    parser.add_argument("--num_register_tokens", type=int, default=4)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--setups", default="abc", help="which setups to run, e.g. 'ac'")
    parser.add_argument("--json", help="also write the results to this file")
    options = vars(parser.parse_args())

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    rows = []
    for setup in options["setups"]:
        process = context.Process(target=measure, args=(setup, options, results))
        process.start()
        rows.append(results.get())
        process.join()

    print(f"model={options['model']} device={options['device']} batch={options['batch_size']} "
          f"steps={options['steps']} bf16={options['bf16']} threads={options['threads']}")  # fmt: skip
    print(f"{'setup':<28}{'trainable params':>18}{'images/s':>12}{'peak MiB':>12}{'training MiB':>14}")
    for row in rows:
        print(
            f"{row['name']:<28}{row['trainable_params']:>18,}{row['images_per_s']:>12.2f}"
            f"{row['peak_memory_mib']:>12.0f}{row['training_memory_mib']:>14.0f}"
        )
    if options["json"]:
        with open(options["json"], "w") as handle:
            json.dump({"options": options, "results": rows}, handle, indent=2)


if __name__ == "__main__":
    main()

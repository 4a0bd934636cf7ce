"""Distillation speed with and without the teacher-target cache, measured in one run.

PH-Reg's teacher runs ``--num_views`` forward passes per image and step; the student one forward and backward pass.
This runs the same distillation twice with ``distill_registers`` (same model, images, batches and epochs):

    (a) without the cache: the teacher runs in every step;
    (b) with ``cache_targets=True``: the teacher runs once per image, before the first step, into a fresh cache.

and prints, for each, the images per second of a training step (the median step after the first; for (b) the steps
read cached targets), by wall-clock and by CPU time, and the time of the whole call (checks, the cache, every epoch,
saving), then the ratios. CPU time counts this process's threads only: on a machine shared with other jobs it
measures the work, where wall time also measures the others. The target is an end-to-end speed-up of at least 3x for
a 10-epoch run.

    python benchmarks/distill_throughput.py                         # ViT-Ti/16-sized, random weights, 224 px, CPU
    python benchmarks/distill_throughput.py --device cuda --bf16 --images 256 --batch_size 32
    python benchmarks/distill_throughput.py --model facebook/dinov2-small --device cuda --bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import datasets
import PIL.Image
import torch
from transformers import TrainerCallback

TARGET = 3.0


def build_model(name: str) -> tuple[torch.nn.Module, object]:
    """A random ViT-Ti/16 for ``vit-tiny`` (no download), else ``load_model(name)``."""
    from register_adapter.loading import load_model

    if name == "vit-tiny":
        import transformers

        from register_adapter.architectures import find_vision_tower
        from register_adapter.pixels import default_processor

        config = transformers.ViTConfig(
            hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224,
            patch_size=16,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.ViTModel(config, add_pooling_layer=False)
        return model, default_processor(find_vision_tower(model))
    return load_model(name)


def images(count: int, size: int) -> datasets.Dataset:
    from register_adapter.testing import make_object_images

    scenes = make_object_images(count, size, seed=0).images
    return datasets.Dataset.from_dict({"image": [PIL.Image.fromarray(image) for image in scenes]})


class StepTimer(TrainerCallback):
    """Wall-clock and CPU seconds of every training step (CPU time counts this process's threads only: on a shared
    machine it measures the work, where wall time also measures the other jobs)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def distill(options: dict, cache: bool, folder: str) -> dict[str, float]:
    """One distillation run: images per second of a training step (median over the steps after the first, by wall
    and by CPU time) and the whole call's wall and CPU seconds."""
    from register_adapter.methods.distillation import PHRegConfig, distill_registers
    from register_adapter.training.distillation import DistillationTrainingArguments

    model, processor = build_model(options["model"])
    data = images(options["images"], options["image_size"])
    args = DistillationTrainingArguments(
        output_dir=f"{folder}/out-{cache}", num_train_epochs=options["epochs"],
        per_device_train_batch_size=options["batch_size"], bf16=options["bf16"], use_cpu=options["device"] == "cpu",
        report_to="none", save_strategy="no", disable_tqdm=True, logging_strategy="no",
        dataloader_num_workers=options["workers"],
    )  # fmt: skip
    config = PHRegConfig(num_views=options["num_views"], cache_targets=cache, target_cache_dir=f"{folder}/cache")
    timer = StepTimer()
    wall, cpu = time.perf_counter(), time.process_time()
    distill_registers(model, data, config, args, processor=processor, callbacks=[timer])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    batch = options["batch_size"]
    return {
        "images_per_s": batch / statistics.median(timer.wall[1:]),
        "images_per_cpu_s": batch / statistics.median(timer.cpu[1:]),
        "wall_s": wall,
        "cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-tiny", help="vit-tiny (random ViT-Ti/16), a tiny-* name, or a Hub id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224, help="side of the generated images")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num_views", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--json", help="also write the results to this file")
    options = vars(parser.parse_args())
    torch.set_num_threads(options["threads"])
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory() as folder:
        rows = {"no cache": distill(options, False, folder), "target cache": distill(options, True, folder)}
    plain, cached = rows["no cache"], rows["target cache"]
    ratios = {
        "per step (wall)": cached["images_per_s"] / plain["images_per_s"],
        "per step (CPU)": cached["images_per_cpu_s"] / plain["images_per_cpu_s"],
        "end to end (wall)": plain["wall_s"] / cached["wall_s"],
        "end to end (CPU)": plain["cpu_s"] / cached["cpu_s"],
    }

    print(f"model={options['model']} device={options['device']} images={options['images']} "
          f"batch={options['batch_size']} epochs={options['epochs']} views={options['num_views']} "
          f"bf16={options['bf16']} threads={options['threads']}")  # fmt: skip
    print(f"{'run':<14}{'images/s per step':>19}{'images/CPU-s':>14}{'end-to-end s':>14}{'end-to-end CPU s':>18}")
    for name, row in rows.items():
        print(
            f"{name:<14}{row['images_per_s']:>19.2f}{row['images_per_cpu_s']:>14.2f}{row['wall_s']:>14.1f}"
            f"{row['cpu_s']:>18.1f}"
        )
    print("cache speed-up: " + ", ".join(f"{value:.2f}x {name}" for name, value in ratios.items()))
    verdict = "pass" if min(ratios["end to end (wall)"], ratios["end to end (CPU)"]) >= TARGET else "fail"
    print(f"target: end to end >= {TARGET}x: {verdict}")
    if options["json"]:
        with open(options["json"], "w") as handle:
            json.dump({"options": options, "results": rows, "ratios": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()

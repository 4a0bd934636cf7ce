"""PH-Reg on models with planted artifacts, against their artifact-free oracle: the numbers in docs/distillation.md.

For each planted family (``register_adapter.testing.make_artifact_model``, 32 px, 2 px patches, 6 blocks) it
measures on 16 held-out scenes

* the share of patch tokens far from the oracle (cosine < 0.5 between final normed patch tokens) for the raw model,
  its denoised teacher (10 views) and the distilled student;
* the share of high-norm patch tokens in the residual stream (norm > 5x the layer's median patch norm, the largest
  share over the block outputs) before and after;

after distilling with the settings of the test (16 training scenes, batch 8, ``--steps`` steps, learning rate 2e-2
decaying to 1e-3, target cache). About a minute per family on a 2-core CPU; nothing is downloaded.

    python examples/distill/measure_planted.py
    python examples/distill/measure_planted.py --families clip clip-vision --steps 120
"""

import argparse
import tempfile
import time

import datasets
import numpy as np
import PIL.Image
import torch

from register_adapter import find_vision_tower
from register_adapter.methods.distillation import DenoisedTeacher, PHRegConfig, distill_registers
from register_adapter.methods.distillation.teacher import final_patch_tokens
from register_adapter.testing import make_artifact_model, make_object_images
from register_adapter.training.distillation import DistillationTrainingArguments

FAMILIES = ["vit", "deit", "dinov2", "dinov2-with-registers", "clip-vision", "clip", "siglip", "ijepa"]


def far_share(features: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((torch.nn.functional.cosine_similarity(features, oracle, dim=-1) < 0.5).float().mean())


def high_norm_share(model: torch.nn.Module, pixels: torch.Tensor, num_patches: int) -> float:
    with torch.no_grad():
        hidden = find_vision_tower(model).module(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]
    norms = [state[:, -num_patches:].norm(dim=-1) for state in hidden]
    return max(float((n > 5 * n.median()).float().mean()) for n in norms)


def measure(family: str, steps: int) -> dict[str, float]:
    planted = make_artifact_model(family)
    train = make_object_images(16, planted.image_size, seed=1).images
    test = planted.preprocess(make_object_images(16, planted.image_size, seed=2).images)
    num_patches = (planted.image_size // planted.patch_size) ** 2
    with torch.no_grad():
        oracle = final_patch_tokens(find_vision_tower(planted.oracle), test)
        raw = final_patch_tokens(find_vision_tower(planted.model), test)
    teacher = DenoisedTeacher(planted.model, processor=planted.processor)
    denoised = teacher(test, rngs=[np.random.default_rng([0, i]) for i in range(len(test))]).flatten(1, 2)
    result = {
        "raw far": far_share(raw, oracle),
        "teacher far": far_share(denoised, oracle),
        "high-norm before": high_norm_share(planted.model, test, num_patches),
    }
    dataset = datasets.Dataset.from_dict({"image": [PIL.Image.fromarray(image) for image in train]})
    with tempfile.TemporaryDirectory() as folder:
        args = DistillationTrainingArguments(
            output_dir=f"{folder}/out", max_steps=steps, learning_rate=2e-2, final_learning_rate=1e-3,
            per_device_train_batch_size=8, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
            logging_strategy="no",
        )  # fmt: skip
        start = time.perf_counter()
        config = PHRegConfig(cache_targets=True, target_cache_dir=f"{folder}/cache")
        student = distill_registers(planted.model, dataset, config, args, processor=planted.processor)
        result["seconds"] = time.perf_counter() - start
    with torch.no_grad():
        result["student far"] = far_share(final_patch_tokens(find_vision_tower(student), test), oracle)
    result["high-norm after"] = high_norm_share(student, test, num_patches)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--steps", type=int, default=200)
    options = parser.parse_args()
    datasets.disable_progress_bars()
    print("| family | far from oracle: raw | denoised teacher | student | drop | high-norm: before | after | drop |")
    print("|---|---|---|---|---|---|---|---|")
    for family in options.families:
        r = measure(family, options.steps)
        far_drop = 1 - r["student far"] / r["raw far"]
        high_drop = 1 - r["high-norm after"] / r["high-norm before"]
        print(
            f"| {family} | {r['raw far']:.2%} | {r['teacher far']:.2%} | {r['student far']:.2%} | {far_drop:.0%} | "
            f"{r['high-norm before']:.2%} | {r['high-norm after']:.2%} | {high_drop:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

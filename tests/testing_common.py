"""Shared helpers of the test matrix: one list of cases over tiny models, and inputs for each."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

from register_adapter.tiny import TINY_MODELS, build_tiny_model, supported_tiny_models, tiny_image_size

UNSUPPORTED = set(TINY_MODELS) - set(supported_tiny_models())  # BEiT, Data2VecVision: refused families

# (tiny model name, task): every supported family and head.
CASES = [(name, task) for name, (_, _, tasks) in TINY_MODELS.items() if name not in UNSUPPORTED for task in tasks]
CASE_IDS = [f"{name}-{task}" for name, task in CASES]

# How an adapter is made: RegisterConfig keyword arguments of each way to fill it. The canonical adapter checks (shapes,
# disable_adapter, train/save/reload) run on every case with every configuration.
ADAPTER_CONFIGS = {
    "registers": {"init": "scaled_randn"},
    "registers+lora": {"init": "scaled_randn", "lora_r": 2},
    "test-time": {"method": "test-time", "register_neurons": [(1, 3), (0, 5)], "init": "scaled_randn"},
    "distilled": {
        "method": "distilled",
        "init": "scaled_randn",
        "unlocked_weights": ["patch_embedding", "last_block"],
    },
}
MATRIX = [(name, task, config) for name, task in CASES for config in ADAPTER_CONFIGS]
MATRIX_IDS = [f"{name}-{task}-{config}" for name, task, config in MATRIX]


def make_inputs(name: str, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for the tiny model ``name``; deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    if name == "tiny-siglip2":
        side = 15  # 15 x 15 patches of 2 x 2 pixels
        return {
            "pixel_values": torch.rand(batch_size, side * side, 3 * 2 * 2, generator=generator),
            "pixel_attention_mask": torch.ones(batch_size, side * side, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * batch_size),
        }
    size = tiny_image_size(name)
    inputs = {"pixel_values": torch.rand(batch_size, 3, size, size, generator=generator)}
    if name == "tiny-clip":
        inputs["input_ids"] = torch.randint(3, 99, (batch_size, 7), generator=generator)
    if name == "tiny-vit-mae":
        num_patches = (size // 2) ** 2
        inputs["noise"] = torch.rand(batch_size, num_patches, generator=generator)  # fixes the random masking
    return inputs


def build(name: str, task: str) -> torch.nn.Module:
    overrides = {"num_labels": 3} if "classification" in task else {}
    return build_tiny_model(name, task, **overrides)


def tensors(output) -> list[torch.Tensor]:
    """Every tensor in a model output, in a fixed order (nested tuples flattened)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    return []


def train_steps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3) -> torch.nn.Module:
    """A few Adam steps on every trainable parameter (a loss that moves every output), then eval mode."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = sum(t.float().pow(2).mean() for t in tensors(model(**inputs)) if t.is_floating_point())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def shapes(output) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors(output)]


def max_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(tensors(a), tensors(b), strict=True))


def hidden_state_norms(model: torch.nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """(L, B, S) token norms at every block output, from the model's own ``output_hidden_states``: an oracle for the
    forward hooks of ``register_adapter.diagnostics`` that shares no code with them. ``kwargs`` go to the forward
    (e.g. ``interpolate_pos_encoding=True``)."""
    tower = getattr(model, "vision_model", model)  # full CLIP: the vision tower alone runs on pixel values only
    with torch.no_grad():
        outputs = tower(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
    return torch.stack([torch.linalg.vector_norm(hidden, dim=-1) for hidden in outputs.hidden_states[1:]])


def hidden_patch_norms(model: torch.nn.Module, pixel_values: torch.Tensor, num_patches: int, **kwargs) -> torch.Tensor:
    """(L, B, N) patch-token norms at every block output (patches come last in every token layout)."""
    return hidden_state_norms(model, pixel_values, **kwargs)[..., -num_patches:]


class ForwardCounter:
    """Counts the forward passes of a model's vision tower: ``with ForwardCounter(model) as counter: ...``."""

    def __init__(self, model: torch.nn.Module):
        from register_adapter.architectures import find_vision_tower

        self.module = find_vision_tower(model).module
        self.calls = 0

    def __enter__(self) -> ForwardCounter:
        self.handle = self.module.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@functools.cache
def planted_model(family: str):
    """``make_artifact_model(family)``, built once per test process."""
    from register_adapter.testing import make_artifact_model

    return make_artifact_model(family)


ROOT = Path(__file__).resolve().parents[1]


def run_script(source: str, folder: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """Run the Python ``source`` with ``args`` in a fresh process (with ``processes`` > 1, that many under
    ``torchrun --standalone``), offline, with this checkout importable."""
    script = folder / "script.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*launcher, str(script), *args], env=env, capture_output=True, text=True)


# A `register-adapter` command whose trainer kills its process with SIGKILL right after saving a checkpoint.
KILLED_RUN = """
import os, signal, sys
from transformers import TrainerCallback
import {module} as module
from register_adapter.cli import main


class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)


class KilledTrainer(module.{trainer}):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(KillAfterCheckpoint())


module.{trainer} = KilledTrainer
sys.exit(main(["{command}", *sys.argv[1:]]))
"""


def killed_run(command: str, module: str, trainer: str, step: int) -> str:
    """The source of a ``register-adapter command`` run whose ``module.trainer`` is killed after checkpoint ``step``."""
    return KILLED_RUN.format(command=command, module=module, trainer=trainer, step=step)

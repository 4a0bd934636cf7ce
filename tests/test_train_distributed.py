"""Multi-process training: ``torchrun --nproc_per_node 2`` with the gloo backend on CPU matches one process."""

from __future__ import annotations

import json

import pytest
import torch
from test_data import make_image_folder
from test_train import cli_args, registers, saved_registers
from testing_common import run_script

from register_adapter.training.classification import parse_args, train

# Runs `register-adapter train` exactly as `torchrun -m register_adapter.cli train` does, and records what each rank
# holds at the end of training and how many images it opened in the check before training.
RECORDING_RUN = """
import os, sys, torch
import register_adapter.sources as data_module
import register_adapter.training.classification as train_module
from register_adapter import RegisterLayer
from register_adapter.cli import main

opened = []
image_problem = data_module._stored_image_problem


def counting_image_problem(value, check):
    opened.append(value["path"])
    return image_problem(value, check)


data_module._stored_image_problem = counting_image_problem


class RecordingTrainer(train_module.Trainer):
    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        layer = next(m for m in model.modules() if isinstance(m, RegisterLayer))
        record = {
            "registers": layer.register_tokens["default"].detach().clone(),
            "world_size": torch.distributed.get_world_size(),
            "backend": torch.distributed.get_backend(),
        }
        torch.save(record, os.path.join(sys.argv[1], f"rank{self.args.process_index}.pt"))
        return result


train_module.Trainer = RecordingTrainer
status = main(["train", *sys.argv[2:]])
with open(os.path.join(sys.argv[1], f"exit{os.environ['RANK']}.txt"), "w") as f:
    f.write(f"status={status} initialized={torch.distributed.is_initialized()} opened={len(opened)}")
sys.exit(status)
"""


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    # 12 training and 4 validation images; global batch 4 = 2 processes x 2 or 1 process x 4; 3 steps per epoch.
    data = make_image_folder(tmp_path / "train", per_class=8)
    schedule = ["--num_train_epochs", "2", "--train_val_split", "0.25", "--save_strategy", "steps",
                "--save_steps", "6", "--load_best_model_at_end", "False"]  # fmt: skip

    single = train(*parse_args(cli_args(data, tmp_path / "single", *schedule))).model

    records = tmp_path / "records"
    records.mkdir()
    out = tmp_path / "ddp"
    args = cli_args(data, out, *schedule, "--ddp_backend", "gloo")
    for flag in ("--per_device_train_batch_size", "--per_device_eval_batch_size"):
        args[args.index(flag) + 1] = "2"
    process = run_script(RECORDING_RUN, tmp_path, str(records), *args, processes=2)
    assert process.returncode == 0, process.stderr[-4000:]
    # Each rank left `main` with its process group destroyed, so no gloo thread outlives the interpreter. Rank 0
    # opened the 16 images once; rank 1 used what it found instead of decoding them again.
    exits = [(records / f"exit{rank}.txt").read_text() for rank in (0, 1)]
    assert exits == ["status=0 initialized=False opened=16", "status=0 initialized=False opened=0"]

    rank0, rank1 = (torch.load(records / f"rank{rank}.pt") for rank in (0, 1))
    assert (rank0["world_size"], rank0["backend"]) == (2, "gloo")
    assert torch.equal(rank0["registers"], rank1["registers"])  # DDP kept the ranks in step
    assert rank0["registers"].abs().max() > 1e-3  # and they trained

    # One process wrote one checkpoint and the final adapter.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-6"]
    assert torch.equal(saved_registers(out), rank0["registers"])

    # Same global batches, same augmentations: the same registers and metrics as one process, up to the order of the
    # gradient reduction.
    torch.testing.assert_close(rank0["registers"], registers(single), rtol=0, atol=1e-6)
    ddp_eval = json.loads((out / "eval_results.json").read_text())
    single_eval = json.loads((tmp_path / "single" / "eval_results.json").read_text())
    assert ddp_eval["eval_accuracy"] == single_eval["eval_accuracy"]
    assert abs(ddp_eval["eval_loss"] - single_eval["eval_loss"]) < 1e-5

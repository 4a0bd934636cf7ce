"""Multi-process distillation: ``torchrun --nproc_per_node 2`` with the gloo backend on CPU matches one process."""

from __future__ import annotations

import pytest
import torch
from test_data import make_image_folder
from test_distill import cli_args, run, saved
from testing_common import run_script

# Runs `register-adapter distill` exactly as `torchrun -m register_adapter.cli distill` does, with target-cache chunks
# of 4 images, and records the adapter each rank holds at the end and the cache chunks it computed.
RECORDING_RUN = """
import os, sys, torch
import register_adapter.methods.distillation.cache as cache_module
import register_adapter.methods.distillation.trainer as trainer_module
from register_adapter.cli import main

cache_module.CHUNK_SIZE = 4
written = []
write_chunk = cache_module._write_chunk


def recording_write_chunk(data, teacher, rows, path, *args):
    written.append(path.name)
    return write_chunk(data, teacher, rows, path, *args)


cache_module._write_chunk = recording_write_chunk


class RecordingTrainer(trainer_module.RegisterDistillationTrainer):
    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if "register_tokens" in k or "unlocked" in k}
        record = {"state": state, "world_size": torch.distributed.get_world_size(), "written": written}
        torch.save(record, os.path.join(sys.argv[1], f"rank{self.args.process_index}.pt"))
        return result


trainer_module.RegisterDistillationTrainer = RecordingTrainer
status = main(["distill", *sys.argv[2:]])
with open(os.path.join(sys.argv[1], f"exit{os.environ['RANK']}.txt"), "w") as f:
    f.write(f"status={status} initialized={torch.distributed.is_initialized()}")
sys.exit(status)
"""


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["teacher-every-step", "target-cache"])
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path, cache):
    # 12 images; global batch 4 = 2 processes x 2 or 1 process x 4; 3 steps per epoch, 2 epochs.
    data = make_image_folder(tmp_path / "train", per_class=6)
    schedule = ["--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "6"]
    if cache:
        schedule += ["--cache_targets", "--cache_dtype", "float32"]
    single = run(data, tmp_path / "single", *schedule, "--target_cache_dir", str(tmp_path / "cache-single"))

    records = tmp_path / "records"
    records.mkdir()
    out = tmp_path / "ddp"
    args = cli_args(data, out, *schedule, "--target_cache_dir", str(tmp_path / "cache-ddp"), "--ddp_backend", "gloo")
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    process = run_script(RECORDING_RUN, tmp_path, str(records), *args, processes=2)
    assert process.returncode == 0, process.stderr[-4000:]
    exits = [(records / f"exit{rank}.txt").read_text() for rank in (0, 1)]
    assert exits == ["status=0 initialized=False", "status=0 initialized=False"]

    rank0, rank1 = (torch.load(records / f"rank{rank}.pt") for rank in (0, 1))
    assert rank0["world_size"] == 2
    assert rank0["state"].keys() == rank1["state"].keys()
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])  # DDP kept them in step
    # With the cache, the 12 images' targets were computed once, in 3 chunks shared between the ranks.
    expected = (["targets-00000.arrow", "targets-00002.arrow"], ["targets-00001.arrow"]) if cache else ([], [])
    assert (rank0["written"], rank1["written"]) == expected

    # One process wrote one checkpoint and the final adapter, the same as one process on the same global batches,
    # up to the order of the gradient reduction.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-6"]
    expected_state = {k: v for k, v in single.state_dict().items() if "register_tokens" in k or "unlocked" in k}
    assert expected_state.keys() == rank0["state"].keys()
    for key, value in rank0["state"].items():
        torch.testing.assert_close(value, expected_state[key], rtol=0, atol=1e-6)
    assert saved(out).keys() == saved(tmp_path / "single").keys()

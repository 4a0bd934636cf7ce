"""The demo that README's first command runs: offline, trains, saves, reloads identically."""

import os

from register_adapter.cli.demo import run


def test_demo_trains_saves_and_reloads_identically(tmp_path):
    report = run(steps=8, out=str(tmp_path))
    assert report["trainable_parameters"] == 4 * 64 + (64 * 6 + 6)  # registers + classifier head
    assert report["register_change_norm"] > 0.01
    assert report["loss_after"] < report["loss_before"]
    assert report["reload_max_abs_diff"] == 0.0
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

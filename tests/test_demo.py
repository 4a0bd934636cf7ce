"""The demo that README's first command runs: offline, trains, saves, reloads identically."""

import os

import pytest

from register_adapter.cli import main
from register_adapter.cli.demo import run


def test_demo_trains_saves_and_reloads_identically(tmp_path):
    report = run(steps=8, out=str(tmp_path))
    assert report["trainable_parameters"] == 4 * 64 + (64 * 6 + 6)  # registers + classifier head
    assert report["register_change_norm"] > 0.01
    assert report["loss_after"] < report["loss_before"]
    assert report["reload_max_abs_diff"] == 0.0
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "./no/model"], "Cannot load model './no/model': no such folder. Give a folder saved with "
         "save_pretrained, a Hub id, a built-in tiny model (tiny-vit, ...) or planted:<family>."),
        (["--model", "tiny-beit"], "BeitModel is not supported: BEiT adds a relative position bias sized to exactly 1 "
         "+ num_patches tokens in every attention layer, so extra tokens cannot be inserted without retraining that "
         "bias."),
        (["--out", "{file}/adapter"], "Cannot write to --out '{file}/adapter': '{file}' is a file, not a folder."),
    ],
    ids=["no such model", "unsupported family", "out under a file"],
)  # fmt: skip
def test_bad_input_ends_the_demo_with_one_error_line_and_exit_2(tmp_path, capsys, argv, message):
    file = tmp_path / "file"
    file.write_text("")
    argv = [arg.format(file=file) for arg in argv]
    assert main(["demo", "--steps", "1", *argv]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"register-adapter demo: error: {message.format(file=file)}"

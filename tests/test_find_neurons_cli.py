"""``register-adapter find-neurons``: the adapter, neurons.json and the picture agree with the API, the push carries
them, and bad input gives one error line and exit status 2."""

import json

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModel

from register_adapter import add_test_time_registers, find_register_neurons
from register_adapter.cli.find_neurons import main
from register_adapter.images import load_image
from register_adapter.testing import make_artifact_model, make_object_images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A planted DINOv2 saved like a Hub checkpoint and a folder of twelve scenes."""
    root = tmp_path_factory.mktemp("find_neurons")
    planted = make_artifact_model("dinov2")
    planted.model.save_pretrained(root / "model")
    planted.processor.save_pretrained(root / "model")
    (root / "images").mkdir()
    for i, image in enumerate(make_object_images(12, 32, seed=8).images):
        Image.fromarray(image).save(root / "images" / f"scene{i:02d}.png")
    return root, planted


def test_adapter_report_and_picture_agree_with_the_api(saved, tmp_path, fake_hub, capsys):
    root, planted = saved
    out = tmp_path / "out"
    argv = ["--model", str(root / "model"), str(root / "images"), "--out", str(out), "--batch_size", "5"]
    assert main([*argv, "--num_register_tokens", "2", "--keep_cls", "--push_to_hub", "org/dinov2-tt"]) == 0

    files = sorted((root / "images").glob("*.png"))
    edit = {"num_register_tokens": 2, "keep_cls": True}  # the report measures the edit the adapter makes
    expected = find_register_neurons(
        planted.model, files, batch_size=5, processor=planted.processor, progress=False, **edit
    )
    assert (expected.num_register_tokens, expected.keep_cls) == (2, True)
    unkept = find_register_neurons(planted.model, files, batch_size=5, processor=planted.processor, progress=False)
    assert unkept.feature_cosine != expected.feature_cosine  # CLS keeps the neurons' activation only with --keep_cls
    assert json.loads((out / "neurons.json").read_text()) == {"model": str(root / "model"), **expected.to_dict()}
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "before_after.png",
        "neurons.json",
    ]
    assert load_image(out / "before_after.png").size == (1200, round(100 * (2.5 * 4 + 1.6)))  # 4 image rows
    assert fake_hub.commits == [
        ("org/dinov2-tt", ["README.md", "adapter_config.json", "adapter_model.safetensors", "neurons.json"])
    ]

    pixel_values = planted.preprocess(make_object_images(3, 32, seed=9).images)
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(root / "model"), out)
    reference = add_test_time_registers(AutoModel.from_pretrained(root / "model"), expected.neurons, 2, keep_cls=True)
    with torch.no_grad():
        got = loaded(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        want = reference(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert loaded.peft_config["default"].neuron_source == expected.source

    lines = capsys.readouterr().out.splitlines()
    assert lines[-6:] == [
        *(f"{name}: {expected.reasons[name]}" for name in ("threshold", "outlier_layer", "top_layer", "top_k")),
        f"2 register neurons on 12 images; outlier patch tokens at block 5: "
        f"{100 * expected.outlier_fraction_before[5]:.2f} % -> 0.00 % with 2 register(s); feature cosine to the base "
        f"model {expected.feature_cosine:.4f}",
        f"wrote the adapter, neurons.json and before_after.png to {out}",
    ]


def test_images_without_outliers_end_with_one_error_line(saved, tmp_path, capsys):
    root, _ = saved
    out = tmp_path / "out"
    assert main(["--model", "tiny-vit", str(root / "images"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "register-adapter find-neurons: error: No outlier patch tokens on the 12 images at any block output with "
        "threshold 'auto', so there is nothing to find register neurons from. Try more images (plain backgrounds "
        "bring artifacts out), another outlier_layer (artifacts appear from the middle blocks on), or a lower fixed "
        "threshold (150 for DINOv2 ViT-L); register_adapter.find_artifacts shows the norms of every layer."
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--top_k", "0", "argument --top_k: must be a whole number, 1 or more; got '0'."),
        ("--top_layer", "x", "argument --top_layer: must be a block index (0 = first block, -1 = last); got 'x'."),
        ("--threshold", "-1", "argument --threshold: A fixed threshold must be a positive, finite number; got -1."),
    ],
)
def test_bad_options_stop_before_loading(saved, tmp_path, capsys, flag, value, message):
    root, _ = saved
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny-vit", str(root / "images"), "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"register-adapter find-neurons: error: {message}"

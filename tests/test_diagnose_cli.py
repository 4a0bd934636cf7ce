"""``register-adapter diagnose``: report.json agrees with the API, the PNGs are written, adapters are compared, and
bad inputs give a clear error and exit status 2."""

import json

import numpy as np
import pytest
from PIL import Image

from register_adapter import add_registers
from register_adapter.cli import main as cli_main
from register_adapter.diagnose import main
from register_adapter.diagnostics import find_artifacts
from register_adapter.images import load_image
from register_adapter.testing import make_artifact_model, make_object_images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A planted DINOv2 saved like a Hub checkpoint (weights + preprocessor config), a folder of three images, and
    a register adapter trained for nothing but saved like a real one."""
    root = tmp_path_factory.mktemp("diagnose")
    planted = make_artifact_model("dinov2")
    planted.model.save_pretrained(root / "model")
    planted.processor.save_pretrained(root / "model")
    scene = make_object_images(3, 32, seed=4)
    (root / "images" / "nested").mkdir(parents=True)
    for i, image in enumerate(scene.images):
        Image.fromarray(image).save(root / "images" / ("nested" if i == 2 else "") / f"scene{i}.png")
    (root / "images" / "notes.txt").write_text("not an image, and not named like one")
    adapter = add_registers(make_artifact_model("dinov2").model, num_register_tokens=4)
    adapter.save_pretrained(root / "adapter")
    return root, planted, scene


def test_report_and_pictures(saved, tmp_path, capsys):
    root, planted, scene = saved
    out = tmp_path / "out"
    assert main(["--model", str(root / "model"), str(root / "images"), "--out", str(out), "--batch-size", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(root / "model") and report["adapter"] is None
    sources = [
        str(root / "images" / "nested" / "scene2.png"),
        str(root / "images" / "scene0.png"),
        str(root / "images" / "scene1.png"),
    ]
    assert [image["source"] for image in report["base"]["images"]] == sources
    pixel_values = planted.preprocess(np.stack([scene.images[2], *scene.images[:2]]))
    expected = find_artifacts(planted.model, pixel_values)
    positions = [[tuple(p) for p in image["outlier_positions"]] for image in report["base"]["images"]]
    assert positions == [image.outlier_positions for image in expected.images]
    assert positions == planted.artifact_positions(pixel_values)  # the ground truth
    assert report["base"]["first_outlier_layer"] == planted.layer
    pictures = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pictures == [
        "norm_histograms.png",
        "norm_scale.png",
        "panels/000_scene2.png",
        "panels/001_scene0.png",
        "panels/002_scene1.png",
    ]
    for picture in pictures:
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width >= 600
    printed = capsys.readouterr().out
    fraction = planted.artifact_mask(pixel_values).float().mean()
    assert f"base: 3 images, {100 * fraction:.2f}% outlier tokens at layer 6" in printed
    assert f"outliers from layer {planted.layer} on" in printed


def test_adapter_before_and_after(saved, tmp_path, monkeypatch):
    root, planted, scene = saved
    out = tmp_path / "out"
    image = str(root / "images" / "scene0.png")
    decoded = []

    def counting_load_image(path, **kwargs):
        decoded.append(path)
        return load_image(path, **kwargs)

    monkeypatch.setattr("register_adapter.images.load_image", counting_load_image)
    assert (
        main(
            [
                "--model",
                str(root / "model"),
                "--adapter",
                str(root / "adapter"),
                image,
                "--out",
                str(out),
                "--threshold",
                "40",
                "--max-panels",
                "1",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["adapter"] == str(root / "adapter")
    assert report["base"]["num_registers"] == 0 and report["with_adapter"]["num_registers"] == 4
    assert len(report["with_adapter"]["images"][0]["register_norms"]) == 4
    assert report["base"]["threshold"] == 40 and report["base"]["layers"][0]["threshold"] == 40
    # Untrained registers leave the planted artifacts where they were.
    truth = [list(p) for p in planted.artifact_positions(planted.preprocess(scene.images[:1]))[0]]
    assert report["base"]["images"][0]["outlier_positions"] == truth
    assert report["with_adapter"]["images"][0]["outlier_positions"] == truth
    # Decoded once per report, and once for all the pictures (panels of both models and before_after.png).
    assert decoded == [root / "images" / "scene0.png"] * 3
    assert {p.name for p in out.rglob("*.png")} == {
        "before_after.png",
        "norm_histograms.png",
        "norm_histograms_adapter.png",
        "norm_scale.png",
        "norm_scale_adapter.png",
        "000_scene0.png",
        "000_scene0_adapter.png",
    }


def test_unreadable_image(saved, tmp_path, capsys):
    root, _, _ = saved
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    code = main(
        [
            "--model",
            str(root / "model"),
            str(root / "images" / "scene0.png"),
            str(broken),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"register-adapter diagnose: error: Cannot read image '{broken}': not an image file that PIL can decode."
    )
    assert not (tmp_path / "out").exists()


def test_missing_path_and_empty_folder_through_the_cli(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["diagnose", "--model", "unused", str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"register-adapter diagnose: error: Image path '{tmp_path / 'nope.png'}' does not exist."
    )
    assert main(["--model", "unused", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"register-adapter diagnose: error: Folder '{tmp_path / 'empty'}' holds no image files."
    )


@pytest.mark.parametrize("value", ["-1", "2.5", "all"])
def test_max_panels_must_be_a_whole_number(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before any image or model is read
        main(["--model", "unused", "photo.png", "--out", str(tmp_path / "out"), "--max-panels", value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"register-adapter diagnose: error: argument --max-panels: must be a whole number, 0 or more; got '{value}'."
    )
    assert not (tmp_path / "out").exists()

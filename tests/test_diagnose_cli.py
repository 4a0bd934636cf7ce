"""``register-adapter diagnose``: report.json agrees with the API, the PNGs are written, adapters are compared, and
bad inputs give a clear error and exit status 2."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from register_adapter import DroppedModulesWarning, add_registers
from register_adapter.cli import main as cli_main
from register_adapter.cli.diagnose import main
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_adapter_before_and_after(saved, tmp_path, monkeypatch):
    root, planted, scene = saved
    out = tmp_path / "out"
    image = str(root / "images" / "scene0.png")
    decoded = []

    def counting_load_image(path, **kwargs):
        decoded.append(path)
        return load_image(path, **kwargs)

    monkeypatch.setattr("register_adapter.pixels.load_image", counting_load_image)
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


def test_an_adapter_trained_on_a_classifier_diagnoses_the_base_model(saved, tmp_path):
    from transformers import Dinov2ForImageClassification

    root, planted, scene = saved
    classifier = Dinov2ForImageClassification.from_pretrained(root / "model", num_labels=2)
    # What `register-adapter train` writes: registers and the head, saved from the classifier.
    trained = add_registers(classifier, 4, init="scaled_randn", modules_to_save=["classifier"], labels=["a", "b"])
    trained.save_pretrained(tmp_path / "trained")
    image, out = str(root / "images" / "scene0.png"), tmp_path / "out"
    argv = ["--model", str(root / "model"), "--adapter", str(tmp_path / "trained"), image, "--out", str(out)]
    warning = (
        "The adapter's classifier (modules_to_save) has no place in Dinov2Model and is not loaded; the rest of the "
        "adapter is. To use it, load the adapter into a model that has it, such as Dinov2ForImageClassification."
    )
    with pytest.warns(DroppedModulesWarning, match=f"^{re.escape(warning)}$"):
        assert main([*argv, "--max-panels", "0"]) == 0

    report = json.loads((out / "report.json").read_text())
    expected = find_artifacts(trained, planted.preprocess(scene.images[:1])).to_dict()
    assert report["with_adapter"]["images"][0]["register_norms"] == expected["images"][0]["register_norms"]
    assert report["with_adapter"]["layers"] == expected["layers"]  # the trained registers, at every layer


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a valid header, half the data
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command loads a model."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("register_adapter.cli.diagnose.load_model", load_model)


def run_error(argv, capsys):
    """Run ``diagnose`` expecting bad input: returns its error line, the last on stderr (transformers may draw a
    progress bar above it)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("register-adapter diagnose: error:") for line in lines) == 1
    return lines[-1]


def test_unreadable_image(saved, tmp_path, capsys, no_model):
    root, _, _ = saved
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    truncated = _truncated_jpeg(tmp_path / "truncated.jpg")
    with Image.open(truncated) as image:
        assert image.size == (80, 64)  # the header alone reads fine
    good = str(root / "images" / "scene0.png")
    for path, reason in (
        (broken, "not an image file that PIL can decode."),
        (truncated, "image file is truncated (144 bytes not processed)."),
    ):
        line = run_error(["--model", "unused", good, str(path), "--out", str(tmp_path / "out")], capsys)
        assert line == f"register-adapter diagnose: error: Cannot read image '{path}': {reason}"
    assert not (tmp_path / "out").exists()


def test_model_and_adapter_that_cannot_be_loaded(saved, tmp_path, capsys):
    root, _, _ = saved
    image, out = str(root / "images" / "scene0.png"), str(tmp_path / "out")
    line = run_error(["--model", "/nonexistent/model", image, "--out", out], capsys)
    assert line == (
        "register-adapter diagnose: error: Cannot load model '/nonexistent/model': no such folder. Give a folder "
        "saved with save_pretrained, a Hub id, a built-in tiny model (tiny-vit, ...) or planted:<family>."
    )
    line = run_error(["--model", str(root / "images"), image, "--out", out], capsys)
    assert line.startswith(f"register-adapter diagnose: error: Cannot load model '{root / 'images'}': ")
    line = run_error(["--model", str(root / "model"), "--adapter", "/nonexistent", image, "--out", out], capsys)
    assert line == (
        "register-adapter diagnose: error: Cannot load adapter '/nonexistent': no such folder. Give a folder saved "
        "with save_pretrained (adapter_config.json and the weights) or a Hub id."
    )
    line = run_error(["--model", str(root / "model"), "--adapter", str(root / "images"), image, "--out", out], capsys)
    assert line == (
        f"register-adapter diagnose: error: Cannot load adapter '{root / 'images'}': Can't find 'adapter_config.json' "
        f"at '{root / 'images'}'. Give a folder saved with save_pretrained (adapter_config.json and the weights) or "
        "a Hub id."
    )
    assert not (tmp_path / "out").exists()


def test_out_that_cannot_be_created(saved, tmp_path, capsys, no_model):
    root, _, _ = saved
    (tmp_path / "file.txt").write_text("a file")
    for out in (tmp_path / "file.txt", tmp_path / "file.txt" / "out"):
        line = run_error(["--model", "unused", str(root / "images"), "--out", str(out)], capsys)
        assert line == (
            f"register-adapter diagnose: error: Cannot write to --out '{out}': '{tmp_path / 'file.txt'}' is a file, "
            "not a folder."
        )


def test_layer_the_model_lacks_creates_no_output(saved, tmp_path, capsys):
    root, _, _ = saved
    line = run_error(
        ["--model", "tiny-vit", str(root / "images"), "--out", str(tmp_path / "out"), "--layer", "9"], capsys
    )
    assert line == (
        "register-adapter diagnose: error: layer must be a whole number in [1, 2], or in [-2, -1] counting from the "
        "end; got 9."
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        (
            "--threshold",
            "otsu",
            "threshold must be a positive number, 'auto', 'bimodal' or 'mean+<k>std' (e.g. 'mean+3std'); got 'otsu'.",
        ),
        ("--threshold", "inf", "A fixed threshold must be a positive, finite number; got inf."),
        ("--threshold", "-3", "A fixed threshold must be a positive, finite number; got -3."),
        ("--layer", "0", "must be a whole number other than 0 (1 = first block output, -1 = last); got '0'."),
        ("--layer", "last", "must be a whole number other than 0 (1 = first block output, -1 = last); got 'last'."),
        ("--batch-size", "0", "must be a whole number, 1 or more; got '0'."),
        ("--batch-size", "2.5", "must be a whole number, 1 or more; got '2.5'."),
    ],
)
def test_options_are_checked_before_anything_is_read(tmp_path, capsys, no_model, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "photo.png", "--out", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1] == f"register-adapter diagnose: error: argument {option}: {message}"
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

"""Training with the HF Trainer: what is trained and saved, LoRA in the same adapter, resume after SIGKILL, bad input,
push to the Hub, and the GPU paths (bf16, fp16, torch.compile)."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_data import BAD_LABELS, COLOURS, make_image, make_image_folder, save_labelled_dataset
from testing_common import killed_run, run_script

from register_adapter import RegisterLayer
from register_adapter.cli import main as cli_main
from register_adapter.errors import DataError, InvalidConfigError, UnsupportedModelError
from register_adapter.tiny import build_tiny_model
from register_adapter.training.classification import check_metric_for_best_model, parse_args, train

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def cli_args(train_dir: Path, output_dir: Path, *extra: str, model: str = "tiny-vit") -> list[str]:
    """Arguments of a small, deterministic CPU run."""
    return [
        "--model", model,
        "--train_dir", str(train_dir),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--use_cpu",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--disable_tqdm", "True",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def dataset_cli_args(dataset: str, output_dir: Path, *extra: str) -> list[str]:
    """:func:`cli_args` with ``--dataset_name dataset`` instead of ``--train_dir``."""
    args = cli_args(Path(dataset), output_dir, *extra)
    args[args.index("--train_dir")] = "--dataset_name"
    return args


def run(*args: str, **kwargs) -> PeftModel:
    return train(*parse_args(cli_args(*args, **kwargs))).model


def registers(model: torch.nn.Module) -> torch.Tensor:
    layer = next(m for m in model.modules() if isinstance(m, RegisterLayer))
    return layer.register_tokens["default"].detach().clone()


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def saved_registers(folder: Path) -> torch.Tensor:
    return next(v for k, v in saved(folder).items() if k.endswith("register_tokens"))


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    pixels = torch.rand(3, 3, 30, 30, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(pixel_values=pixels).logits


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "train", per_class=8)


def test_training_changes_registers_and_head_only_and_keeps_the_best_adapter(images, tmp_path):
    out = tmp_path / "out"
    # At this learning rate validation accuracy is perfect from the first evaluation on, and the Trainer keeps the
    # first of equal scores: the best checkpoint (step 3) is not the last (step 9).
    args = ["--num_train_epochs", "3", "--train_val_split", "0.25", "--learning_rate", "3e-2"]
    trainer = train(*parse_args(cli_args(images, out, *args)))
    model = trainer.model
    fresh = build_tiny_model("tiny-vit", "classification", num_labels=2)

    assert registers(model).abs().max() > 1e-3  # initialised with std 1e-6
    trained = dict(model.get_base_model().named_parameters())
    assert not torch.equal(trained["classifier.modules_to_save.default.weight"], fresh.classifier.weight)
    for name, weight in fresh.vit.named_parameters():
        trained_name = f"vit.{name}".replace("vit.embeddings.", "vit.embeddings.base_layer.")
        assert torch.equal(trained[trained_name], weight), name  # the base model stays frozen

    # The output folder holds the adapter (registers + head) and no model weights.
    weights = [p.name for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert not [w for w in weights if w.startswith(("model", "pytorch_model"))]
    assert {p.name for p in out.iterdir()} >= ADAPTER_FILES
    assert sorted(saved(out)) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
        "base_model.model.vit.embeddings.register_tokens",
    ]

    # The best checkpoint by validation accuracy, not the last one, is the saved adapter.
    evals = [log for log in trainer.state.log_history if "eval_accuracy" in log]
    best = max(evals, key=lambda log: log["eval_accuracy"])  # the first of equals, as the Trainer keeps it
    assert (best["step"], trainer.state.global_step) == (3, 9)
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-3")
    assert torch.equal(saved_registers(out), saved_registers(out / "checkpoint-3"))
    assert not torch.equal(saved_registers(out), saved_registers(out / "checkpoint-9"))
    assert torch.equal(saved_registers(out), registers(model))

    # Anyone restores it with PeftModel.from_pretrained: identical outputs.
    restored = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=2), out)
    assert torch.equal(logits(restored), logits(model))

    # The model card reports the final evaluation and the setup.
    results = json.loads((out / "eval_results.json").read_text())
    card = (out / "README.md").read_text()
    assert f"| eval_accuracy | {results['eval_accuracy']:.4g} |" in card
    assert "| base model | tiny-vit |" in card and "| training images | 12 |" in card
    # ... and its metadata holds them as model-index results, which the Hub shows.
    from huggingface_hub import ModelCard

    (entry,) = ModelCard(card).data.eval_results
    assert (entry.task_type, entry.dataset_type, entry.dataset_name, entry.dataset_split) == (
        "image-classification",
        "imagefolder",
        "train",
        "0.25 held out of train",
    )
    assert (entry.metric_type, entry.metric_value) == ("accuracy", results["eval_accuracy"])

    # The adapter config holds the label names; next to it, the image processor's config and no config.json (which
    # would make transformers take the folder for a full model).
    assert json.loads((out / "adapter_config.json").read_text())["labels"] == ["blue", "red"]
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 30, "width": 30}
    assert not (out / "config.json").exists()


def test_the_output_folder_loads_as_a_classifier_with_its_labels_in_one_line(tmp_path):
    from peft import AutoPeftModel
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    from register_adapter import find_vision_tower
    from register_adapter.pixels import default_processor

    base = build_tiny_model("tiny-vit", "classification")  # a pretrained head of 2 classes
    base.save_pretrained(tmp_path / "base")
    default_processor(find_vision_tower(base)).save_pretrained(tmp_path / "base")
    images = make_image_folder(tmp_path / "train", classes=("blue", "green", "red"), per_class=4)
    out = tmp_path / "out"
    args = ["--max_steps", "2", "--train_val_split", "0", "--learning_rate", "3e-2"]
    trained = run(images, out, *args, model=str(tmp_path / "base"))

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    assert torch.equal(logits(model), logits(trained))
    assert torch.equal(logits(AutoPeftModel.from_pretrained(out)), logits(trained))

    classify = pipeline("image-classification", model=str(out))
    image = Image.new("RGB", (30, 30), (40, 180, 60))
    with torch.no_grad():
        pixels = classify.image_processor(image, return_tensors="pt")["pixel_values"]
        probabilities = trained.eval()(pixel_values=pixels).logits.softmax(-1)[0]
    expected = sorted(zip(probabilities.tolist(), ("blue", "green", "red")), reverse=True)
    predictions = classify(image)
    assert [p["label"] for p in predictions] == [label for _, label in expected]
    # The pipeline computes its own softmax (in numpy): equal up to rounding.
    assert [p["score"] for p in predictions] == pytest.approx([score for score, _ in expected], abs=1e-6)


def test_lora_registers_and_head_are_one_adapter_that_from_pretrained_restores_whole(images, tmp_path):
    out = tmp_path / "out"
    model = run(images, out, "--max_steps", "6", "--train_val_split", "0", "--lora_r", "4", "--learning_rate", "1e-2")
    keys = sorted(saved(out))
    assert "base_model.model.vit.embeddings.register_tokens" in keys
    assert "base_model.model.classifier.weight" in keys
    assert {k for k in keys if "lora_" in k} == {
        f"base_model.model.vit.layers.{i}.attention.{proj}.lora_{ab}.weight"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in "AB"
    }
    lora_b = [v for k, v in saved(out).items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in lora_b)  # LoRA B starts at zero: it trained

    restored = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=2), out)
    assert torch.equal(logits(restored), logits(model))
    assert torch.equal(registers(restored), registers(model))
    # Without LoRA the outputs differ: the restored LoRA weights take part.
    lora_free = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=2), out)
    for name, module in lora_free.named_modules():
        if name.endswith(("q_proj", "v_proj")) and hasattr(module, "scaling"):
            module.scaling["default"] = 0.0
    assert not torch.allclose(logits(lora_free), logits(model))


KILL_AT_STEP = 4


@pytest.mark.slow
def test_run_killed_after_a_checkpoint_resumes_to_the_same_registers(tmp_path):
    # 12 images, batch 4: 3 steps per epoch; the kill at step 4 lands inside the second epoch, so resuming skips
    # batches and has to reproduce that epoch's augmentations.
    data = make_image_folder(tmp_path / "train", per_class=6)
    schedule = ["--num_train_epochs", "3", "--train_val_split", "0", "--save_strategy", "steps", "--save_steps", "2"]
    reference = run(data, tmp_path / "reference", *schedule)

    killed = tmp_path / "killed"
    source = killed_run("train", "register_adapter.training.classification", "Trainer", KILL_AT_STEP)
    process = run_script(source, tmp_path, *cli_args(data, killed, *schedule))
    assert process.returncode == -9, process.stderr[-3000:]
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not (killed / "adapter_model.safetensors").exists()  # it never finished

    checkpoint = killed / f"checkpoint-{KILL_AT_STEP}"
    resumed = run(data, killed, *schedule, "--resume_from_checkpoint", str(checkpoint))
    assert torch.equal(registers(resumed), registers(reference))
    assert torch.equal(saved_registers(killed), saved_registers(tmp_path / "reference"))
    assert torch.equal(logits(resumed), logits(reference))


# bad input: a clear message before training starts -------------------------------------------------------------------


def test_unsupported_family_is_refused_before_training(images, tmp_path):
    message = (
        "BeitModel is not supported: BEiT adds a relative position bias sized to exactly 1 + num_patches tokens in "
        "every attention layer, so extra tokens cannot be inserted without retraining that bias."
    )
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
        run(images, tmp_path / "out", model="tiny-beit")
    assert not (tmp_path / "out").exists()


def test_missing_label_column_is_refused_before_training(tmp_path):
    folder = load_folder_as_saved_dataset(tmp_path)
    args = cli_args(tmp_path, tmp_path / "out", "--label_column_name", "species")
    args[args.index("--train_dir") : args.index("--train_dir") + 2] = ["--dataset_name", folder]
    with pytest.raises(
        DataError,
        match=rf"^The label column 'species' does not exist in split 'train' of {re.escape(repr(folder))}. "
        r"Available columns: image, label.$",
    ):
        train(*parse_args(args))
    assert not (tmp_path / "out").exists()


def cli_error(argv: list[str], capsys) -> tuple[int, str]:
    """The exit status of ``register-adapter train argv`` and the last line it wrote to stderr."""
    try:
        status = cli_main(["train", *argv])
    except SystemExit as exit_info:  # argparse's errors
        status = exit_info.code
    return status, capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_label_stops_the_cli_before_training_or_is_skipped(tmp_path, capsys):
    path = save_labelled_dataset(tmp_path, {"train": BAD_LABELS}, datasets.ClassLabel(names=["cat", "dog"]))
    out = tmp_path / "out"
    assert cli_error(dataset_cli_args(path, out, "--max_steps", "1", "--train_val_split", "0"), capsys) == (
        2,
        "register-adapter train: error: 1 of 39 train rows have no label or a label outside 0..1 (2 classes): rows "
        "30. Fix or remove those rows, or pass --on_bad_image skip to leave them out.",
    )
    assert not out.exists()

    args = dataset_cli_args(path, out, "--max_steps", "1", "--train_val_split", "0", "--on_bad_image", "skip")
    assert len(train(*parse_args(args)).train_dataset) == 38


CLI_ERRORS = {
    "unknown flag": (["--bogus_flag", "1"], "unrecognized arguments: --bogus_flag 1"),
    "bf16 on a CPU": (
        ["--bf16"],
        "Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want to train the model on CPU.",
    ),
    "register setting out of range": (
        ["--num_register_tokens", "0"],
        "num_register_tokens must be a positive int, got 0. Papers use 4 (trained) or 16 (PH-Reg).",
    ),
    "no such model": (["--model", "./no/such/model"], "Cannot load model './no/such/model': no such folder. Give a "
                      "folder saved with save_pretrained, a Hub id, a built-in tiny model (tiny-vit, ...) or "
                      "planted:<family>."),
}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="--bf16 works on a CUDA machine")
@pytest.mark.parametrize(("extra", "message"), CLI_ERRORS.values(), ids=CLI_ERRORS)
def test_cli_errors_end_with_one_error_line_and_exit_2(tmp_path, capsys, extra, message):
    args = [arg for arg in cli_args(tmp_path / "no-images", tmp_path / "out") if arg != "--use_cpu"]
    if "--model" in extra:  # checked before the data: the missing --train_dir is not reported
        args[args.index("--model") : args.index("--model") + 2] = []
    assert cli_error([*args, *extra], capsys) == (2, f"register-adapter train: error: {message}")
    assert not (tmp_path / "out").exists()


def test_unreadable_images_of_every_split_are_reported_at_once(tmp_path):
    train_dir = make_image_folder(tmp_path / "train", per_class=4)
    validation_dir = make_image_folder(tmp_path / "val", per_class=2)
    truncated = train_dir / "red" / "004.jpg"
    buffer = io.BytesIO()
    make_image(COLOURS["red"], 7, size=(128, 128)).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.getvalue()[:2000])
    not_an_image = validation_dir / "blue" / "notes.png"
    not_an_image.write_text("meeting notes, saved with the wrong extension")
    args = cli_args(train_dir, tmp_path / "out", "--validation_dir", str(validation_dir))
    message = (
        rf"^1 of 9 train images cannot be read: {re.escape(str(truncated))} \(.+\)\. "
        rf"1 of 5 validation images cannot be read: {re.escape(str(not_an_image))} \(.+\)\. "
        r"Remove or replace them, or pass --on_bad_image skip to leave them out\.$"
    )
    with pytest.raises(DataError, match=message):
        train(*parse_args(args))


def load_folder_as_saved_dataset(tmp_path: Path) -> str:
    from register_adapter.training.data import load_image_folder

    root = make_image_folder(tmp_path / "images", per_class=2)
    path = str(tmp_path / "saved")
    load_image_folder(root).save_to_disk(path)
    return path


def test_corrupt_image_stops_the_cli_before_training_or_is_skipped(images, tmp_path, capsys):
    corrupt = images / "red" / "003.png"
    corrupt.write_bytes(b"not a png at all")
    out = tmp_path / "out"
    status, error = cli_error(cli_args(images, out, "--max_steps", "2", "--train_val_split", "0"), capsys)
    assert status == 2 and error.startswith(
        f"register-adapter train: error: 1 of 16 train images cannot be read: {corrupt}"
    )
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()

    trainer = train(*parse_args(cli_args(images, out, "--max_steps", "2", "--train_val_split", "0",
                                         "--on_bad_image", "skip")))  # fmt: skip
    assert len(trainer.train_dataset) == 15
    assert (out / "adapter_model.safetensors").exists()


def test_max_train_samples_are_drawn_at_random_with_the_data_seed(images, tmp_path):
    # The folder rows are sorted by class: the first four images are all "blue".
    args = ["--max_steps", "1", "--train_val_split", "0", "--max_train_samples", "4", "--data_seed", "3"]
    rows = train(*parse_args(cli_args(images, tmp_path / "out", *args))).train_dataset.with_format(None)
    assert len(rows) == 4 and set(rows["label"]) == {0, 1}

    def drawn(out, *options):
        dataset = train(*parse_args(cli_args(images, tmp_path / out, *args, *options))).train_dataset
        return list(dataset.with_format(None)["sample_id"])

    # The draw follows --data_seed, not --seed: the same rows under another --seed, others under another --data_seed.
    assert drawn("again", "--seed", "7") == list(rows["sample_id"])
    assert drawn("other", "--data_seed", "4") != list(rows["sample_id"])


RESUME_CASES = {
    "missing folder": (
        "{tmp}/nope",
        "--resume_from_checkpoint '{tmp}/nope' does not exist, so it is not a checkpoint to resume from.",
    ),
    "not a checkpoint": (
        "{tmp}",
        "--resume_from_checkpoint '{tmp}' has no trainer_state.json, so it is not a checkpoint to resume from.",
    ),
    "latest without checkpoints": (
        "True",
        "--resume_from_checkpoint True found no checkpoint-N folder in --output_dir '{tmp}/out'. Leave out "
        "--resume_from_checkpoint to start a new run, or pass the path of a checkpoint folder.",
    ),
}
RESUME_FIX = (
    " Pass a checkpoint-N folder that an earlier run saved in its --output_dir (it holds trainer_state.json), or "
    "'latest' for the newest one in --output_dir."
)


@pytest.mark.parametrize(("value", "message"), RESUME_CASES.values(), ids=RESUME_CASES)
def test_resume_without_a_checkpoint_is_refused_before_loading_data(tmp_path, value, message):
    (tmp_path / "out").mkdir()
    message = message.format(tmp=tmp_path) + ("" if value == "True" else RESUME_FIX)
    args = cli_args(tmp_path / "no-images", tmp_path / "out", "--resume_from_checkpoint", value.format(tmp=tmp_path))
    # The missing --train_dir would be a DataError: the checkpoint is checked first.
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        train(*parse_args(args))


def test_push_to_hub_uploads_the_best_adapter_with_our_card_in_one_commit(images, tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: None)  # a server call
    out = tmp_path / "out"
    args = ["--num_train_epochs", "2", "--train_val_split", "0.25", "--push_to_hub", "--hub_model_id", "org/regs",
            "--hub_token", "hf_test"]  # fmt: skip
    model = run(images, out, *args)
    assert len(fake_hub.commits) == 1
    repo, files = fake_hub.commits[0]
    assert repo == "org/regs"
    assert set(files) == ADAPTER_FILES | {"README.md", "preprocessor_config.json"}
    snapshot = fake_hub.snapshot("org/regs")
    assert json.loads((snapshot / "adapter_config.json").read_text())["labels"] == ["blue", "red"]
    card = (snapshot / "README.md").read_text()
    assert "register_adapter" in card and "| eval_accuracy |" in card and "org/regs" in card
    restored = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=2), snapshot)
    assert torch.equal(logits(restored), logits(model))


# GPU paths: run where CUDA is available ------------------------------------------------------------------------------


def _gpu_args(images: Path, out: Path, *extra: str) -> list[str]:
    args = cli_args(images, out, "--max_steps", "6", "--train_val_split", "0.25", "--eval_strategy", "steps",
                    "--eval_steps", "3", "--save_steps", "3", "--save_strategy", "steps", *extra)  # fmt: skip
    args.remove("--use_cpu")
    return args


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_training_on_gpu_trains_registers_in_fp32_and_restores(images, tmp_path, precision):
    out = tmp_path / "out"
    model = train(*parse_args(_gpu_args(images, out, precision))).model
    tokens = next(m for m in model.modules() if isinstance(m, RegisterLayer)).register_tokens["default"]
    assert tokens.device.type == "cuda" and tokens.dtype == torch.float32  # master weights stay fp32 under autocast
    assert tokens.abs().max() > 1e-3
    assert saved(out)["base_model.model.vit.embeddings.register_tokens"].dtype == torch.float32
    restored = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=2), out).cuda()
    pixels = torch.rand(2, 3, 30, 30, device="cuda")
    with torch.no_grad():
        assert torch.equal(restored.eval()(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)


@pytest.mark.gpu
def test_torch_compile_on_gpu_saves_plain_adapter_keys_that_restore(images, tmp_path):
    out = tmp_path / "out"
    model = train(*parse_args(_gpu_args(images, out, "--torch_compile"))).model
    assert all("_orig_mod" not in key for key in saved(out))
    assert all(p.device.type == "cuda" for p in model.parameters())
    restored = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=2), out).cuda()
    assert torch.equal(registers(restored), registers(model))
    pixels = torch.rand(2, 3, 30, 30, device="cuda")
    with torch.no_grad():
        expected = getattr(model, "_orig_mod", model).eval()(pixel_values=pixels).logits
        torch.testing.assert_close(restored.eval()(pixel_values=pixels).logits, expected)


def test_cli_help_lists_training_register_and_data_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    usage = "usage: register-adapter train --model MODEL (--train_dir DIR | --dataset_name NAME) --output_dir DIR"
    assert text.startswith(f"{usage} [options]\n")
    offered = re.search(r"built-in tiny model for offline runs \(([^)]*)\)", " ".join(text.split()))[1]
    offered = re.sub(r"-\s+", "-", offered)  # argparse may wrap a line after a hyphen
    # not the refused families, nor the tiny models without a classification class (tiny-dinov3, ...)
    assert offered.split(", ") == ["tiny-clip", "tiny-deit", "tiny-dinov2", "tiny-dinov2-with-registers", "tiny-ijepa",
                                   "tiny-vit"]  # fmt: skip
    for flag in ("--model", "--train_dir", "--num_register_tokens", "--on_bad_image", "--bf16", "--push_to_hub",
                 "--resume_from_checkpoint", "--per_device_train_batch_size"):  # fmt: skip
        assert re.search(rf"^\s+{flag}\b", text, re.MULTILINE), flag


PUSH_CASES = {
    "offline": (
        ["--hub_token", "hf_test"],
        "--push_to_hub cannot create the Hub repository 'org/regs': offline mode is on (HF_HUB_OFFLINE=1). Unset "
        "HF_HUB_OFFLINE to push, or leave out --push_to_hub.",
    ),
    "no token": (
        [],
        "--push_to_hub cannot create the Hub repository 'org/regs': no Hugging Face token was found. Log in with "
        "`hf auth login`, set HF_TOKEN or pass --hub_token; or leave out --push_to_hub.",
    ),
}


@pytest.mark.parametrize(("extra", "message"), PUSH_CASES.values(), ids=PUSH_CASES)
def test_push_to_hub_that_cannot_work_stops_before_training(images, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("register_adapter.training.runtime.get_token", lambda: None)
    out = tmp_path / "out"
    args = cli_args(images, out, "--max_steps", "2", "--push_to_hub", "--hub_model_id", "org/regs", *extra)
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        train(*parse_args(args))
    assert not out.exists()  # no data loaded, no step trained, no checkpoint written


METRIC_CASES = {
    "top-5 with two classes": "top5_accuracy",
    "typo": "eval_acuracy",
}


@pytest.mark.parametrize("name", METRIC_CASES.values(), ids=METRIC_CASES)
def test_metric_for_best_model_that_evaluation_does_not_report_is_refused_before_training(images, tmp_path, name):
    out = tmp_path / "out"
    message = (
        f"--metric_for_best_model {name!r} is not a metric that evaluation reports. Valid names: loss, accuracy "
        "(with or without the eval_ prefix); top5_accuracy needs more than 5 classes, the training data has 2."
    )
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        run(images, out, "--max_steps", "2", "--train_val_split", "0.25", "--metric_for_best_model", name)
    assert not out.exists()


def test_metric_for_best_model_is_accepted_with_or_without_the_eval_prefix():
    for name in ("loss", "eval_loss", "accuracy", "eval_accuracy", "top5_accuracy", "eval_top5_accuracy"):
        check_metric_for_best_model(name, 6)
    with pytest.raises(InvalidConfigError, match="^--metric_for_best_model 'eval_f1' .* Valid names: loss, accuracy, "
                       r"top5_accuracy \(with or without the eval_ prefix\).$"):  # fmt: skip
        check_metric_for_best_model("eval_f1", 6)


def training_args(tmp_path: Path, *extra: str):
    return parse_args(cli_args(tmp_path, tmp_path / "out", *extra))[-1]


def test_bare_load_best_model_at_end_flag_means_true(tmp_path):
    assert training_args(tmp_path, "--load_best_model_at_end", "--save_strategy", "epoch").load_best_model_at_end
    assert not training_args(tmp_path, "--load_best_model_at_end", "False").load_best_model_at_end


BEST_MODEL_DEFAULTS = [
    ([], True),
    (["--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "epoch"], False),
    (["--save_strategy", "steps", "--save_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2"], True),
    (["--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "steps", "--eval_steps", "2"], False),
    (["--save_strategy", "epoch", "--eval_strategy", "no"], False),
    (["--save_strategy", "no"], False),
]


@pytest.mark.parametrize(("extra", "expected"), BEST_MODEL_DEFAULTS)
def test_best_model_loading_defaults_on_only_where_every_saved_checkpoint_is_evaluated(tmp_path, extra, expected):
    assert training_args(tmp_path, *extra).load_best_model_at_end is expected


def test_best_model_loading_left_off_for_incompatible_strategies_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="register_adapter.training"):
        training_args(tmp_path, "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "epoch")
    assert (
        "Not loading the best checkpoint at the end: --load_best_model_at_end needs every saved checkpoint evaluated, "
        "which --save_strategy steps with --eval_strategy epoch does not do. Use the same strategy for both (with "
        "steps, --save_steps a multiple of --eval_steps) to turn it on." in caplog.text
    )


def test_eval_strategy_and_steps_follow_save_strategy_and_steps(tmp_path):
    args = training_args(tmp_path, "--save_strategy", "steps", "--save_steps", "7")
    assert (args.eval_strategy.value, args.eval_steps, args.load_best_model_at_end) == ("steps", 7, True)


def test_resume_with_other_adapter_settings_is_refused_before_training(images, tmp_path):
    out = tmp_path / "out"
    schedule = ["--train_val_split", "0", "--save_strategy", "steps", "--save_steps", "2"]
    run(images, out, "--max_steps", "2", *schedule)
    checkpoint = out / "checkpoint-2"
    message = (
        f"--resume_from_checkpoint {str(checkpoint)!r} holds an adapter with other settings: num_register_tokens 4 "
        "in the checkpoint, 2 now; lora_r 0 in the checkpoint, 4 now. Resume with the checkpoint's settings, or leave "
        "out --resume_from_checkpoint to start a new run."
    )
    other = ["--num_register_tokens", "2", "--lora_r", "4", "--resume_from_checkpoint", str(checkpoint)]
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        run(images, out, "--max_steps", "4", *schedule, *other)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_register_flags_are_an_explicit_list_with_the_config_defaults(capsys):
    import dataclasses

    from register_adapter import RegisterConfig
    from register_adapter.training.arguments import RegisterArguments

    names = [field.name for field in dataclasses.fields(RegisterArguments)]
    assert names == [
        "num_register_tokens",
        "init",
        "strip_registers",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ]
    chosen, config = RegisterArguments(), RegisterConfig()
    assert {name: getattr(chosen, name) for name in names} == {name: getattr(config, name) for name in names}
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    usage = capsys.readouterr().out
    assert "--num_register_tokens" in usage and "--lora_target_modules" in usage
    # Fields filled in from the model or by a method are not flags.
    assert not any(f"--{name} " in usage for name in ("family", "hidden_size", "method", "target_modules"))

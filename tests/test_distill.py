"""``register-adapter distill`` on the HF Trainer: what is saved and reported, the learning-rate schedule, the target
cache, resuming after SIGKILL, the Hub, bad input refused before any forward pass, and bf16 on a GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from test_data import make_image_folder
from testing_common import killed_run, run_script

from register_adapter.errors import DataError, InvalidConfigError
from register_adapter.methods.distillation import DenoisedTeacher, PHRegConfig, distill_registers
from register_adapter.methods.distillation.data import DistillationImages, view_rng
from register_adapter.pixels import default_processor
from register_adapter.sources import load_unlabelled_images
from register_adapter.tiny import build_tiny_model
from register_adapter.training.distillation import DistillationTrainingArguments, distill, parse_args

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def cli_args(images: Path, output_dir: Path, *extra: str, model: str = "tiny-dinov2") -> list[str]:
    """Arguments of a small, deterministic CPU run: 12 images, batch 4, 4 teacher views."""
    return [
        "--model", model,
        "--train_dir", str(images),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--num_views", "4",
        "--use_cpu",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--disable_tqdm", "True",
        "--logging_steps", "1",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def run(*args: str, **kwargs) -> PeftModel:
    return distill(*parse_args(cli_args(*args, **kwargs)))


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def features(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    pixels = torch.rand(3, 3, 30, 30, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(pixel_values=pixels).last_hidden_state


def default_processor_for(name: str):
    from register_adapter import find_vision_tower

    return default_processor(find_vision_tower(build_tiny_model(name)))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "train", per_class=6)  # 12 images, in class folders: labels are ignored


def test_distill_saves_one_adapter_with_a_card_of_the_run_that_from_pretrained_restores(images, tmp_path):
    out = tmp_path / "out"
    model = run(images, out, "--num_train_epochs", "2")
    assert type(model) is PeftModel

    prefix = "base_model.model.embeddings."
    assert sorted(saved(out)) == sorted(
        [f"{prefix}register_tokens", f"{prefix}base_layer.unlocked_weights.position_embeddings"]
        + [f"{prefix}base_layer.unlocked_weights.patch_embeddings.projection.{n}" for n in ("weight", "bias")]
        + [f"base_model.model.encoder.layer.1.unlocked_weights.{n}" for n, _ in
           build_tiny_model("tiny-dinov2").encoder.layer[1].named_parameters()]
    )  # fmt: skip
    assert saved(out)[f"{prefix}register_tokens"].shape == (1, 16, 32)
    restored = PeftModel.from_pretrained(build_tiny_model("tiny-dinov2"), out)
    assert torch.equal(features(restored), features(model))
    assert not torch.equal(features(model), features(build_tiny_model("tiny-dinov2")))

    # 12 images, batch 4, 2 epochs: 6 steps, the learning rate decays exponentially from 1e-4 to exactly 5e-6.
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    for entry in logged:
        assert entry["learning_rate"] == pytest.approx(1e-4 * 0.05 ** ((entry["step"] - 1) / 5), rel=1e-9)
    assert (logged[0]["learning_rate"], logged[-1]["learning_rate"]) == pytest.approx((1e-4, 5e-6), rel=1e-12)

    card = (out / "README.md").read_text()
    assert (
        "| method | post-hoc self-distilled registers, PH-Reg ([arXiv 2505.21501](https://arxiv.org/abs/2505.21501)) |"
        in card
    )
    assert "| trained copies of the base weights | position embeddings, patch embedding, last block |" in card
    assert f"| final loss | {logged[-1]['loss']:.4g} |" in card
    for row in ("| base model | tiny-dinov2 |", "| register tokens | 16 |", "| teacher views | 4 |", "| max shift | 0.15 |",
                "| loss | 1.0 * (1 - cos) + 1.0 * MSE |", "| learning rate | 0.0001 -> 5e-06 (exponential) |",
                "| training images | 12 |", "| target cache | False |"):  # fmt: skip
        assert row in card, row
    assert "- registers-distilled" in card and "arxiv.org/abs/2505.21501" in card
    assert model.card_metadata["metrics"]["final loss"] == logged[-1]["loss"]


# the learning-rate schedule --------------------------------------------------------------------------------------


def learning_rates(steps: int, warmup: int = 0) -> list[float]:
    """The learning rate of each optimizer step of a ``steps``-step run with the PH-Reg schedule."""
    from types import SimpleNamespace

    from register_adapter.methods.distillation import RegisterDistillationTrainer

    args = DistillationTrainingArguments(output_dir="unused", warmup_steps=warmup, use_cpu=True, report_to="none")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = RegisterDistillationTrainer.create_scheduler(SimpleNamespace(args=args, lr_scheduler=None), steps,
                                                             optimizer)  # fmt: skip
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("steps", "warmup", "first"),
    [(10, 0, [1e-4]), (10, 2, [1e-4 / 3, 2e-4 / 3, 1e-4]), (2, 0, [1e-4]), (1, 0, [1e-4])],
)
def test_the_learning_rate_decays_to_exactly_the_final_one_at_the_last_step(steps, warmup, first):
    rates = learning_rates(steps, warmup)
    assert rates[: len(first)] == pytest.approx(first, rel=1e-12)
    if steps - warmup > 1:
        assert rates[-1] == pytest.approx(5e-6, rel=1e-12)
        assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1 :]))


@pytest.mark.parametrize("final", [0.0, -1e-6, 2e-4])
def test_a_final_learning_rate_outside_the_decay_is_refused(final):
    message = (
        f"final_learning_rate must satisfy 0 < final_learning_rate <= learning_rate (0.0001), got {final!r}. PH-Reg "
        "decays from 1e-4 to 5e-6; pass --final_learning_rate None to use --lr_scheduler_type instead."
    )
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        DistillationTrainingArguments(output_dir="unused", final_learning_rate=final, use_cpu=True, report_to="none")


# the target cache --------------------------------------------------------------------------------------------------


def count_forward_passes():
    """Counts the forward passes of the teacher and the student (both run the tower through ``run_tower``)."""
    from register_adapter.methods.distillation import teacher

    return mock.patch.object(teacher, "run_tower", side_effect=teacher.run_tower)


def count_teacher_calls():
    return mock.patch.object(DenoisedTeacher, "__call__", autospec=True, side_effect=DenoisedTeacher.__call__)


def test_cached_targets_are_the_teachers_and_later_runs_and_epochs_skip_the_teacher(images, tmp_path):
    cache = ["--cache_targets", "--cache_dtype", "float32", "--target_cache_dir", str(tmp_path / "cache"),
             "--num_train_epochs", "2"]  # fmt: skip
    with count_teacher_calls() as teacher:
        run(images, tmp_path / "first", *cache)
    assert teacher.call_count == 3  # 12 images, 4 per call, once: no epoch ran the teacher

    # Each cached row is the teacher's target of that image, with the views its index draws.
    (folder,) = (tmp_path / "cache").iterdir()
    rows = datasets.Dataset.from_file(str(folder / "targets-00000.arrow")).with_format("torch")
    data = DistillationImages(load_unlabelled_images(images), default_processor_for("tiny-dinov2"), 2, (30, 30))
    fresh = DenoisedTeacher(build_tiny_model("tiny-dinov2"), num_views=4)
    for index in (0, 7):
        expected = fresh(data.pixel_values(index)[None], rngs=[view_rng(0, index)])[0]
        assert torch.equal(rows[index]["targets"], expected)

    with count_teacher_calls() as teacher:
        run(images, tmp_path / "second", *cache)
    assert teacher.call_count == 0
    assert saved(tmp_path / "first").keys() == saved(tmp_path / "second").keys()
    assert all(torch.equal(saved(tmp_path / "first")[k], v) for k, v in saved(tmp_path / "second").items())

    # Other settings are another cache: it is computed, not read.
    with count_teacher_calls() as teacher:
        run(images, tmp_path / "third", *cache, "--max_shift", "0.3")
    assert teacher.call_count == 3
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_an_image_changed_after_caching_stops_the_run(images, tmp_path):
    cache = ["--cache_targets", "--target_cache_dir", str(tmp_path / "cache"), "--max_steps", "1"]
    run(images, tmp_path / "first", *cache)
    first = sorted(images.rglob("*.png"))[0]
    Image.new("RGB", (30, 30), (0, 255, 0)).save(first)  # same file, other pixels: the dataset's fingerprint holds
    message = (
        "The cached targets of image 0 were computed from other pixels: the image changed after the target cache was "
        "made. Delete the cache folder (--target_cache_dir) to compute them again."
    )
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        run(images, tmp_path / "second", *cache, "--max_steps", "3")


def test_the_teacher_fingerprint_follows_the_weights_and_settings_not_the_adapter():
    from register_adapter import add_registers

    base = build_tiny_model("tiny-vit")
    reference = DenoisedTeacher(base).fingerprint()
    student = add_registers(base, 4, unlocked_weights=["position_embeddings", "patch_embedding", "last_block"])
    assert DenoisedTeacher(student).fingerprint() == reference
    assert DenoisedTeacher(student, num_views=5).fingerprint() != reference
    with torch.no_grad():
        student.get_base_model().layernorm.weight[0] += 1e-3
    assert DenoisedTeacher(student).fingerprint() != reference


def test_the_cache_key_follows_the_processors_settings_not_its_instance(images):
    from transformers import ViTImageProcessorPil

    from register_adapter.methods.distillation.cache import cache_key

    teacher = DenoisedTeacher(build_tiny_model("tiny-vit"), num_views=2)

    def key(**settings) -> str:
        processor = ViTImageProcessorPil(size={"height": 30, "width": 30}, **settings)
        data = DistillationImages(load_unlabelled_images(images), processor, 2, (30, 30))
        return cache_key(data, teacher, seed=0, dtype="float16", precision="fp32")

    assert key() == key()  # two instances, the same settings: one cache
    assert key(image_mean=[0.4, 0.5, 0.5]) != key()
    assert key(resample=0) != key()


class Resize:
    """An image processor without ``to_json_string``: nothing but its ``repr`` would name its settings."""

    size = {"height": 30, "width": 30}

    def __call__(self, images, **kwargs):
        arrays = [
            np.asarray(image.resize((30, 30)), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1 for image in images
        ]
        return {"pixel_values": arrays}


def assert_refused_before_any_forward_pass(tmp_path, model, images, processor, error, message):
    """distill_registers with the target cache raises ``error`` with exactly ``message``, before any forward pass and
    before writing anything."""
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, use_cpu=True, report_to="none")
    config = PHRegConfig(num_views=2, cache_targets=True, target_cache_dir=str(tmp_path / "cache"))
    with count_forward_passes() as passes, pytest.raises(error, match=f"^{re.escape(message)}$"):
        distill_registers(build_tiny_model(model), images, config, args, processor=processor)
    assert passes.call_count == 0 and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_processor_the_cache_cannot_be_keyed_on_is_refused_before_any_forward_pass(images, tmp_path):
    message = (
        "cache_targets keys the target cache on the image processor's settings, but Resize has no to_json_string() to "
        "read them from (transformers image processors have one). Pass a transformers image processor, or leave out "
        "--cache_targets."
    )
    assert_refused_before_any_forward_pass(tmp_path, "tiny-vit", images, Resize(), InvalidConfigError, message)


def test_cache_chunks_are_shared_between_processes(tmp_path, images):
    from register_adapter.methods.distillation import cache as cache_module

    data = DistillationImages(load_unlabelled_images(images), default_processor_for("tiny-vit"), 2, (30, 30))
    teacher = DenoisedTeacher(build_tiny_model("tiny-vit"), num_views=2)
    options = {"seed": 0, "dtype": "float32", "batch_size": 2}

    class Barrier(Exception):
        pass

    def stop() -> None:
        raise Barrier

    shared = tmp_path / "shared"
    with mock.patch.object(cache_module, "CHUNK_SIZE", 5):  # 12 images: chunks of 5, 5 and 2
        with pytest.raises(Barrier):
            cache_module.cached_targets(data, teacher, shared, process_index=1, num_processes=2,
                                        wait_for_everyone=stop, **options)  # fmt: skip
        assert sorted(p.name for p in shared.iterdir()) == ["targets-00001.arrow"]  # process 1's share only
        together = cache_module.cached_targets(data, teacher, shared, process_index=0, num_processes=2, **options)
        alone = cache_module.cached_targets(data, teacher, tmp_path / "alone", **options)
    assert sorted(p.name for p in shared.iterdir()) == [f"targets-0000{k}.arrow" for k in range(3)]
    assert together[:]["pixel_digest"] == alone[:]["pixel_digest"]
    assert torch.equal(together.with_format("torch")[:]["targets"], alone.with_format("torch")[:]["targets"])


# resume, the Hub -------------------------------------------------------------------------------------------------

KILL_AT_STEP = 4


@pytest.mark.slow
def test_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(images, tmp_path):
    # 12 images, batch 4: 3 steps per epoch; the kill at step 4 lands inside the second epoch, whose teacher views
    # differ from the first's: resuming has to draw the same ones.
    schedule = ["--num_train_epochs", "3", "--save_strategy", "steps", "--save_steps", "2"]
    reference = run(images, tmp_path / "reference", *schedule)

    killed = tmp_path / "killed"
    source = killed_run(
        "distill", "register_adapter.methods.distillation.trainer", "RegisterDistillationTrainer", KILL_AT_STEP
    )
    process = run_script(source, tmp_path, *cli_args(images, killed, *schedule))
    assert process.returncode == -9, process.stderr[-3000:]
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not (killed / "adapter_model.safetensors").exists()

    resumed = run(images, killed, *schedule, "--resume_from_checkpoint", "latest")
    assert saved(killed).keys() == saved(tmp_path / "reference").keys()
    assert all(torch.equal(saved(tmp_path / "reference")[k], v) for k, v in saved(killed).items())
    assert torch.equal(features(resumed), features(reference))


def test_resuming_with_other_unlocked_weights_is_refused(images, tmp_path):
    out = tmp_path / "out"
    run(images, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    message = (
        f"--resume_from_checkpoint '{out / 'checkpoint-2'}' holds an adapter with other settings: unlocked_weights "
        "['last_block', 'patch_embedding', 'position_embeddings'] in the checkpoint, ['last_block', "
        "'position_embeddings'] now. Resume with the checkpoint's settings, or leave out --resume_from_checkpoint to "
        "start a new run."
    )
    with count_forward_passes() as passes, pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        run(images, out, "--max_steps", "4", "--unlock_patch_embedding", "False", "--resume_from_checkpoint", "latest")
    assert passes.call_count == 0


def test_push_to_hub_uploads_the_adapter_with_its_card_in_one_commit(images, tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: None)  # a server call
    model = run(images, tmp_path / "out", "--max_steps", "2", "--push_to_hub", "--hub_model_id", "org/phreg",
                "--hub_token", "hf_test")  # fmt: skip
    assert fake_hub.commits == [("org/phreg", ["README.md", "adapter_config.json", "adapter_model.safetensors"])]
    snapshot = fake_hub.snapshot("org/phreg")
    card = (snapshot / "README.md").read_text()
    assert "| final loss |" in card and 'PeftModel.from_pretrained(base, "org/phreg")' in card
    restored = PeftModel.from_pretrained(build_tiny_model("tiny-dinov2"), snapshot)
    assert torch.equal(features(restored), features(model))


# bad input: refused before any forward pass ------------------------------------------------------------------------


def small_images(root: Path) -> Path:
    make_image_folder(root, per_class=2)
    Image.new("RGB", (9, 20)).save(root / "red" / "thumbnail.png")
    return root


@pytest.mark.parametrize(
    ("make", "extra", "error", "message"),
    [
        (small_images, [], DataError,
         r"1 of 5 train images cannot be read: .*thumbnail\.png \(9x20 pixels, smaller than the 15x15 patch grid: "
         r"less than one pixel per patch\)\. Remove or replace them, or pass --on_bad_image skip to leave them out\."),
        (make_image_folder, ["--max_shift", "0.97"], InvalidConfigError,
         r"max_shift=0\.97 shifts views by up to 15 patches on a grid of 15 patch rows: a view shifted that far "
         r"shows none of the image's patches\. Use a max_shift below 0\.967, or larger images\."),
        (make_image_folder, ["--model", "tiny-dinov3", "--unlock_position_embeddings", "True"], None,
         r"unlocked_weights includes 'position_embeddings', but DINOv3ViTModel \(dinov3_vit\) has no learned "
         r"position table"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_any_forward_pass(tmp_path, make, extra, error, message):
    from register_adapter.errors import UnsupportedModelError

    data = make(tmp_path / "train")
    with count_forward_passes() as passes, pytest.raises(error or UnsupportedModelError, match=f"^{message}"):
        run(data, tmp_path / "out", "--max_steps", "1", *extra)
    assert passes.call_count == 0
    assert not (tmp_path / "out").exists()


def mixed_size_images(root: Path) -> list[Path]:
    """Three 30x30 images and two 20x40 ones (height x width)."""
    root.mkdir(parents=True)
    files = []
    for i, (height, width) in enumerate([(30, 30)] * 3 + [(20, 40)] * 2):
        files.append(root / f"{i}.png")
        pixels = np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(files[-1])
    return files


def test_images_that_would_come_out_at_several_sizes_are_refused_before_any_forward_pass(tmp_path):
    from transformers import ViTImageProcessorPil

    message = (
        "The images would come out of ViTImageProcessorPil (do_resize=False, size={'height': 224, 'width': 224}, "
        "do_center_crop=None) at 2 different sizes (height x width): 30x30 (3 images), 20x40 (2 images). "
        "Distillation needs every image on one patch grid. Pass a processor that resizes to a fixed size "
        "(size={'height': H, 'width': W}) or centre-crops (do_center_crop=True with a crop_size)."
    )
    images, processor = mixed_size_images(tmp_path / "train"), ViTImageProcessorPil(do_resize=False)
    assert_refused_before_any_forward_pass(tmp_path, "tiny-dinov2", images, processor, DataError, message)


def test_a_processor_that_gives_the_images_one_size_trains_on_them(tmp_path):
    from transformers import ViTImageProcessorPil

    from register_adapter.methods.distillation.data import common_output_size

    files = mixed_size_images(tmp_path / "train")
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                         use_cpu=True, report_to="none", save_strategy="no")  # fmt: skip
    # A resize to a height and a width (any image sizes), a shortest-edge resize of images of one size (20x40 -> 30x60).
    for processor, images, size in [
        (ViTImageProcessorPil(size={"height": 30, "width": 30}), files, (30, 30)),
        (ViTImageProcessorPil(size={"shortest_edge": 30}), files[3:], (30, 60)),
    ]:
        assert common_output_size(load_unlabelled_images(images), processor) == size
        model = distill_registers(build_tiny_model("tiny-dinov2"), images, PHRegConfig(num_views=2), args,
                                  processor=processor)  # fmt: skip
        assert type(model) is PeftModel


def test_a_dataset_without_an_image_column_is_refused(tmp_path):
    dataset = datasets.Dataset.from_dict({"picture": [np.zeros((4, 4, 3), dtype=np.uint8)]})
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with pytest.raises(DataError, match=r"^The image column 'image' does not exist in the dataset \(1 rows\)\. "
                                        r"Available columns: picture\.$"):  # fmt: skip
        distill_registers(build_tiny_model("tiny-vit"), dataset, PHRegConfig(), args)


def test_a_peft_model_is_refused(tmp_path, images):
    from register_adapter import add_registers

    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with pytest.raises(InvalidConfigError, match=r"^distill_registers takes the base model, got a PeftModel "
                                                 r"\(ViTModel with adapters \['default'\]\)\."):  # fmt: skip
        distill_registers(add_registers(build_tiny_model("tiny-vit"), 4), images, PHRegConfig(), args)


# GPU: run where CUDA is available ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [[], ["--cache_targets"]])
def test_bf16_distillation_on_gpu_keeps_adapter_weights_in_fp32_and_restores(images, tmp_path, cache):
    out = tmp_path / "out"
    args = cli_args(images, out, "--max_steps", "4", "--bf16", "--target_cache_dir", str(tmp_path / "c"), *cache)
    args.remove("--use_cpu")
    model = distill(*parse_args(args))
    weights = saved(out)
    assert all(value.dtype == torch.float32 for value in weights.values())
    assert all(torch.isfinite(value).all() for value in weights.values())
    restored = PeftModel.from_pretrained(build_tiny_model("tiny-dinov2"), out).cuda()
    pixels = torch.rand(2, 3, 30, 30, device="cuda")
    with torch.no_grad():
        assert torch.equal(restored.eval()(pixel_values=pixels).last_hidden_state,
                           model.eval()(pixel_values=pixels).last_hidden_state)  # fmt: skip


def test_cli_bad_input_ends_with_one_error_line_of_the_distill_command_and_exit_2(tmp_path, capsys):
    from register_adapter.cli.distill import main

    status = main(cli_args(tmp_path / "no-images", tmp_path / "out"))
    assert (status, capsys.readouterr().err.strip().splitlines()[-1]) == (
        2,
        f"register-adapter distill: error: Image path '{tmp_path / 'no-images'}' does not exist.",
    )
    assert not (tmp_path / "out").exists()


def test_a_processor_without_save_pretrained_trains_and_checkpoints(images, tmp_path):
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=1,
                                         per_device_train_batch_size=4, use_cpu=True, report_to="none")  # fmt: skip
    distill_registers(build_tiny_model("tiny-dinov2"), images, PHRegConfig(num_views=2), args, processor=Resize())
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()

"""Every PeftModel holding a register adapter saves, describes and pushes itself the same way, however it was made;
adapter files that do not belong together are refused with a typed error."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from register_adapter import (
    AdapterFilesError,
    AdapterMismatchError,
    InvalidConfigError,
    RegisterConfig,
    add_registers,
    from_dinov2_with_registers,
    saving,
)
from register_adapter.saving import SAFETENSORS_ONLY
from register_adapter.tiny import build_tiny_model

X = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
REGISTER_KEY = "base_model.model.vit.embeddings.register_tokens"


def classifier():
    base = build_tiny_model("tiny-vit", "classification", num_labels=3)
    base.name_or_path = base.config._name_or_path = "org/tiny-vit"  # as from_pretrained("org/tiny-vit") sets them
    return base


def saved_adapter(folder, **kwargs):
    model = add_registers(classifier(), 4, init="scaled_randn", modules_to_save=["classifier"], **kwargs)
    model.save_pretrained(folder)
    return model


def test_get_peft_model_writes_the_register_card(tmp_path):
    model = get_peft_model(classifier(), RegisterConfig(num_register_tokens=2))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "# tiny-vit with 2 register tokens" in card and "[More Information Needed]" not in card


def test_other_peft_methods_keep_peft_behaviour(tmp_path):
    model = get_peft_model(classifier(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, safe_serialization=False)  # allowed: not a register adapter
    assert "adapter_model.bin" in os.listdir(tmp_path)
    assert "register tokens" not in (tmp_path / "README.md").read_text()


def test_pickled_saves_and_pushes_are_refused(fake_hub, tmp_path):
    model = saved_adapter(tmp_path / "adapter")
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(SAFETENSORS_ONLY)}$"):
        model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(SAFETENSORS_ONLY)}$"):
        model.push_to_hub("org/pickled", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "adapter")) == ADAPTER_FILES
    assert fake_hub.commits == []


def test_each_folder_of_a_save_holds_the_card_of_the_adapter_stored_in_it(tmp_path):
    model = add_registers(classifier(), 4)
    model.add_adapter("eight", RegisterConfig(num_register_tokens=8))
    model.set_adapter("eight")
    model.save_pretrained(tmp_path)
    for folder, count in ((tmp_path, 4), (tmp_path / "eight", 8)):
        assert json.loads((folder / "adapter_config.json").read_text())["num_register_tokens"] == count
        card = (folder / "README.md").read_text()
        assert f"# tiny-vit with {count} register tokens" in card and f"| register tokens | {count} |" in card


def eight_registers():
    return add_registers(classifier(), 8, init="scaled_randn", modules_to_save=["classifier"])


def test_a_save_that_stops_between_its_moves_leaves_the_previous_adapter(tmp_path, monkeypatch):
    old = saved_adapter(tmp_path)
    real_replace = os.replace
    failed = []

    def fail_on_the_config(source, target):
        if str(target).endswith("adapter_config.json") and not failed:  # the weights are moved already
            failed.append(target)
            raise OSError("No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail_on_the_config)
    with pytest.raises(OSError, match="^No space left on device$"):
        eight_registers().save_pretrained(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)

    assert sorted(os.listdir(tmp_path)) == ADAPTER_FILES
    assert "# tiny-vit with 4 register tokens" in (tmp_path / "README.md").read_text()
    reloaded = PeftModel.from_pretrained(classifier(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=X).logits, old(pixel_values=X).logits)


def test_a_save_killed_while_removing_its_journal_leaves_the_new_adapter_whole(tmp_path, monkeypatch):
    saved_adapter(tmp_path)
    new = eight_registers()
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        kept = os.path.join(path, "files", "adapter_config.json")
        if os.path.exists(kept):  # every new file is in place; the journal's removal has begun
            os.remove(kept)
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    monkeypatch.setattr(saving, "_process_runs", lambda pid: False)  # the saving process is gone

    reloaded = PeftModel.from_pretrained(classifier(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=X).logits, new(pixel_values=X).logits)
    assert sorted(os.listdir(tmp_path)) == ADAPTER_FILES


@pytest.mark.slow  # a fresh Python process imports torch, transformers and peft
def test_a_save_killed_between_its_moves_is_rolled_back_when_the_adapter_is_loaded(tmp_path, caplog):
    old = saved_adapter(tmp_path)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_saving import eight_registers

        real_replace = os.replace

        def kill_on_the_config(source, target):
            if str(target).endswith("adapter_config.json"):  # the weights are moved already
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(source, target)

        model = eight_registers()
        os.replace = kill_on_the_config
        model.save_pretrained({str(tmp_path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert load_file(tmp_path / "adapter_model.safetensors")[REGISTER_KEY].shape == (
        1,
        8,
        32,
    )  # new weights, old config

    with caplog.at_level(logging.WARNING, logger="register_adapter.saving"):
        reloaded = PeftModel.from_pretrained(classifier(), tmp_path)
    assert caplog.messages == [f"Restoring the adapter in {tmp_path} that a killed save had begun to replace."]
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=X).logits, old(pixel_values=X).logits)
    assert sorted(os.listdir(tmp_path)) == ADAPTER_FILES


def test_an_adapter_with_only_pickled_weights_is_refused_without_unpickling(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    message = (
        f"{tmp_path / 'adapter_model.safetensors'} is missing: the adapter folder holds only "
        "['README.md', 'adapter_config.json', 'adapter_model.bin']. adapter_model.bin is a pickle, which "
        "register_adapter does not load (unpickling can run code). Save the adapter again with "
        "model.save_pretrained(folder), which writes safetensors."
    )
    with pytest.raises(AdapterFilesError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(classifier(), tmp_path)


def test_weights_and_config_from_different_saves_are_refused(tmp_path):
    saved_adapter(tmp_path / "four")
    add_registers(classifier(), 8, modules_to_save=["classifier"]).save_pretrained(tmp_path / "eight")
    os.replace(tmp_path / "eight" / "adapter_model.safetensors", tmp_path / "four" / "adapter_model.safetensors")
    weights = tmp_path / "four" / "adapter_model.safetensors"
    message = (
        f"{weights} holds registers of shape [1, 8, 32] (base_model.model.vit.embeddings.register_tokens), but its "
        "adapter_config.json says 4 registers of width 32: the two files come from different saves. "
        "Save the adapter again."
    )
    with pytest.raises(AdapterFilesError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(classifier(), tmp_path / "four")


def test_one_config_object_serves_two_models_of_different_families():
    config = RegisterConfig(num_register_tokens=3)
    vit = get_peft_model(build_tiny_model("tiny-vit"), config)
    dinov2 = get_peft_model(build_tiny_model("tiny-dinov2"), config)
    assert (config.family, config.hidden_size) == (None, None)  # the user's object is left as it was
    assert vit.peft_config["default"].family == "vit"
    assert dinov2.peft_config["default"].family == "dinov2"


def test_an_adapter_records_and_checks_the_native_registers_it_follows(tmp_path):
    native = build_tiny_model("tiny-dinov2-with-registers")  # 2 native registers
    converted = from_dinov2_with_registers(native)  # base: the same architecture with 0 native registers
    converted.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["native_register_tokens"] == 0

    message = (
        "This adapter was made for native_register_tokens=0, but the model has native_register_tokens=2 "
        "(Dinov2WithRegistersModel). Load it into a model of the same family and size."
    )
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(build_tiny_model("tiny-dinov2-with-registers"), tmp_path)

    empty = build_tiny_model("tiny-dinov2-with-registers", num_register_tokens=0)
    empty.load_state_dict(converted.get_base_model().state_dict(), strict=False)
    reloaded = PeftModel.from_pretrained(empty, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=X).pooler_output, native(pixel_values=X).pooler_output)


def test_lora_targets_that_match_no_linear_layer_are_refused():
    message = (
        "lora_target_modules entry 'query' matches no layer in the blocks of CLIPVisionModel: LoRA inside a register "
        "adapter wraps linear layers. Its blocks have these: ['fc1', 'fc2', 'k_proj', 'out_proj', 'q_proj', 'v_proj']."
    )
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        add_registers(
            build_tiny_model("tiny-clip", "classification"), lora_r=4, lora_target_modules=["query", "value"]
        )


def test_registers_are_kept_in_float32_on_a_bfloat16_model_as_peft_does(tmp_path):
    model = add_registers(build_tiny_model("tiny-vit").to(torch.bfloat16), 4)
    registers = model.base_model.model.embeddings.register_tokens["default"]
    assert registers.dtype == torch.float32  # small updates are not rounded away in training
    with torch.no_grad():
        out = model(pixel_values=X.to(torch.bfloat16))
    assert out.last_hidden_state.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.model.embeddings.register_tokens"].dtype == (
        torch.float32
    )

    as_is = get_peft_model(
        build_tiny_model("tiny-vit").to(torch.bfloat16), RegisterConfig(), autocast_adapter_dtype=False
    )
    assert as_is.base_model.model.embeddings.register_tokens["default"].dtype == torch.bfloat16


def test_numpy_integers_are_whole_numbers():
    config = RegisterConfig(num_register_tokens=np.int64(4), lora_r=np.int32(2))
    assert (type(config.num_register_tokens), type(config.lora_r)) == (int, int)
    assert json.loads(json.dumps(config.to_dict()))["num_register_tokens"] == 4


def test_peft_arguments_pass_positionally_for_register_and_other_adapters(tmp_path):
    lora = get_peft_model(classifier(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora", True, ["default"])
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "lora")
    model = add_registers(classifier(), 2)
    model.add_adapter("second", RegisterConfig(num_register_tokens=5))
    model.save_pretrained(tmp_path / "regs", True, ["second"])  # safe_serialization, selected_adapters
    assert sorted(os.listdir(tmp_path / "regs")) == ["README.md", "second"]
    assert "# tiny-vit with 5 register tokens" in (tmp_path / "regs" / "README.md").read_text()


def test_a_process_that_is_not_the_main_one_writes_nothing_and_leaves_running_saves_alone(tmp_path):
    model = saved_adapter(tmp_path)
    running = tmp_path / f".saving-{socket.gethostname()}-{os.getpid()}-abc123"  # this process: alive
    killed = tmp_path / f".saving-{socket.gethostname()}-{dead_pid()}-def456"
    for folder in (running, killed):
        folder.mkdir()
    model.save_pretrained(tmp_path, is_main_process=False)
    assert sorted(os.listdir(tmp_path)) == sorted([*ADAPTER_FILES, running.name, killed.name])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([*ADAPTER_FILES, running.name])


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_push_takes_the_push_to_hub_mixin_arguments(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    seen = {}
    original = HfApi.create_commit
    monkeypatch.setattr(HfApi, "create_commit", lambda self, *a, **kw: seen.update(kw) or original(self, *a, **kw))
    model = saved_adapter(tmp_path)
    model.push_to_hub("org/tagged", tags=["demo"], commit_message=None, private=None)
    assert seen["commit_message"] == "Upload register adapter"
    card = (fake_hub.snapshot("org/tagged") / "README.md").read_text()
    assert "- registers-trained\n- demo\n" in card


def test_saves_still_work_after_installing_twice_and_after_a_module_reload(tmp_path):
    import importlib

    import register_adapter.peft_integration as hub

    hub.install_peft_model_methods()
    importlib.reload(hub)
    hub.install_peft_model_methods()
    saved_adapter(tmp_path / "regs")
    get_peft_model(classifier(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    assert sorted(os.listdir(tmp_path / "regs")) == ADAPTER_FILES
    assert "# tiny-vit with 4 register tokens" in (tmp_path / "regs" / "README.md").read_text()
    assert "register tokens" not in (tmp_path / "lora" / "README.md").read_text()

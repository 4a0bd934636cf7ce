"""LoRA inside a register adapter: one adapter with registers, LoRA and a head, on every family."""

import copy

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import load_file
from testing_common import build, make_inputs, max_diff, train_steps

from register_adapter import InvalidConfigError, RegisterConfig, RegisterLayer, add_registers, find_vision_tower
from register_adapter.tiny import TINY_MODELS

FAMILIES = ["tiny-vit", "tiny-dinov2", "tiny-clip", "tiny-siglip2", "tiny-dinov3", "tiny-aimv2"]


def lora_model(name, task="base", **kwargs):
    base = build(name, task).requires_grad_(False)
    model = add_registers(copy.deepcopy(base), 2, init="scaled_randn", lora_r=2, **kwargs)
    return base, model


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_goes_on_the_vision_towers_q_and_v_projections_only(name):
    _, model = lora_model(name)
    tower = find_vision_tower(model)
    wrapped = sorted(key for key, module in model.named_modules() if isinstance(module, LoraLayer))
    # Two per block of the vision tower; never a text tower (CLIPModel has one with the same layer names).
    assert len(wrapped) == 2 * len(tower.blocks)
    assert not any("text_model" in key for key in wrapped)
    assert {key.rsplit(".", 1)[-1] for key in wrapped} == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    registers = [n for n in trainable if n.endswith("embeddings.register_tokens.default")]
    lora = [n for n in trainable if ".lora_A.default." in n or ".lora_B.default." in n]
    assert len(registers) == 1 and len(lora) == 2 * len(wrapped) and len(trainable) == 1 + len(lora)


@pytest.mark.parametrize("name", FAMILIES)
def test_registers_lora_and_head_save_and_reload_as_one_adapter(name, tmp_path):
    task = "classification" if "classification" in TINY_MODELS[name][2] else "base"
    extra = {"modules_to_save": ["classifier"]} if task == "classification" else {}
    _, model = lora_model(name, task, **extra)
    inputs = make_inputs(name)
    train_steps(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("register_tokens" in key for key in saved)
    assert sum("lora_A" in key for key in saved) == sum("lora_B" in key for key in saved) > 0
    assert ("base_model.model.classifier.weight" in saved) == (task == "classification")
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it trained

    restored = PeftModel.from_pretrained(build(name, task), tmp_path).eval()
    with torch.no_grad():
        assert max_diff(restored(**inputs), model(**inputs)) == 0.0


def test_adapters_with_and_without_lora_switch_cleanly():
    base, model = lora_model("tiny-vit")
    inputs = make_inputs("tiny-vit")
    train_steps(model, inputs)
    model.add_adapter("plain", RegisterConfig(num_register_tokens=1, init="zeros"))
    model.set_adapter("plain")
    with torch.no_grad():
        plain = model(**inputs)
        model.set_adapter("default")
        with_lora = model(**inputs)
    # Only the zero register is active in "plain": LoRA of "default" must not leak into it.
    reference = add_registers(copy.deepcopy(base), 1, init="zeros").eval()
    with torch.no_grad():
        assert max_diff(plain, reference(**inputs)) == 0.0
    assert max_diff(with_lora, plain) > 1e-4


def test_unload_gives_back_plain_linear_layers_and_the_trained_head():
    base, model = lora_model("tiny-vit", "classification", modules_to_save=["classifier"])
    train_steps(model, make_inputs("tiny-vit"))
    trained_head = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    restored = model.unload()
    assert not any(isinstance(m, (LoraLayer, RegisterLayer)) for m in restored.modules())
    assert type(restored.vit.layers[0].attention.q_proj) is torch.nn.Linear
    assert type(restored.classifier) is torch.nn.Linear
    assert torch.equal(restored.classifier.weight, trained_head)
    assert torch.equal(restored.vit.layers[0].attention.q_proj.weight, base.vit.layers[0].attention.q_proj.weight)


def test_lora_targets_must_be_linear_layers():
    with pytest.raises(InvalidConfigError) as error:
        lora_model("tiny-vit", lora_target_modules=["attention"])
    assert str(error.value) == (
        "lora_target_modules entry 'attention' matches ViTAttention, not nn.Linear in the blocks of ViTModel: LoRA "
        "inside a register adapter wraps linear layers. Its blocks have these: ['fc1', 'fc2', 'k_proj', 'o_proj', "
        "'q_proj', 'v_proj']."
    )


def test_a_second_adapter_with_lora_wraps_the_layers_the_first_one_wrapped(tmp_path):
    model = add_registers(build("tiny-vit", "base"), 2, lora_r=2)
    model.add_adapter("second", RegisterConfig(num_register_tokens=3, lora_r=4, init="scaled_randn"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, weight in model.named_parameters():
            if "lora_B.second" in key:  # LoRA B starts at zero
                weight.copy_(torch.randn(weight.shape, generator=generator))
    model.set_adapter("second")
    inputs = make_inputs("tiny-vit")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    model.save_pretrained(tmp_path)  # default in tmp_path, second in tmp_path/second

    loaded = PeftModel.from_pretrained(build("tiny-vit", "base"), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    loaded.set_adapter("second")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, expected)

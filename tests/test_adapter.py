"""The canonical adapter tests, over every supported family and head (tiny models built from configs)."""

import copy
import inspect
import os
import re

import pytest
import torch
import transformers
from peft import PeftModel
from testing_common import (
    ADAPTER_CONFIGS,
    CASE_IDS,
    CASES,
    MATRIX,
    MATRIX_IDS,
    build,
    make_inputs,
    max_diff,
    shapes,
    train_steps,
)

from register_adapter import (
    FamilySpec,
    InvalidConfigError,
    RegisterConfig,
    RegisterLayer,
    UnsupportedModelError,
    add_registers,
    architectures,
    find_vision_tower,
    split_tokens,
    supported_model_types,
    token_layout,
)

NUM_REGISTERS = 3


def adapted(name, task, config="registers", **kwargs):
    # Frozen like the adapted copy: nn.MultiheadAttention (SigLIP's pooling head) picks its kernel by requires_grad.
    base = build(name, task).requires_grad_(False)
    return base, add_registers(copy.deepcopy(base), NUM_REGISTERS, **{**ADAPTER_CONFIGS[config], **kwargs})


@pytest.mark.parametrize(("name", "task", "config"), MATRIX, ids=MATRIX_IDS)
def test_outputs_keep_the_base_model_shapes(name, task, config):
    base, model = adapted(name, task, config)
    inputs = make_inputs(name)
    with torch.no_grad():
        expected, got = base(**inputs), model(**inputs)
    assert type(got) is type(expected)
    assert shapes(got) == shapes(expected)
    assert max_diff(got, expected) > 1e-4  # the registers take part in attention


@pytest.mark.parametrize(("name", "task", "config"), MATRIX, ids=MATRIX_IDS)
def test_disable_adapter_and_unload_give_the_base_model_outputs(name, task, config):
    base, model = adapted(name, task, config)
    inputs = make_inputs(name)
    train_steps(model, inputs)  # LoRA starts as the identity: train it so that disabling it matters
    with torch.no_grad(), model.disable_adapter():
        got = model(**inputs)
    with torch.no_grad():
        expected = base(**inputs)
        assert max_diff(model(**inputs), expected) > 1e-4
    assert max_diff(got, expected) == 0.0
    restored = model.unload()  # every tuner layer replaced by the module it wrapped
    assert [type(m) for m in restored.modules()] == [type(m) for m in base.modules()]
    with torch.no_grad():
        assert max_diff(restored(**inputs), expected) == 0.0


@pytest.mark.parametrize(("name", "task", "config"), MATRIX, ids=MATRIX_IDS)
def test_train_save_reload(name, task, config, tmp_path):
    base, model = adapted(name, task, config)
    inputs = make_inputs(name)
    with torch.no_grad():
        before = model(**inputs)
    train_steps(model, inputs)
    with torch.no_grad():
        after = model(**inputs)
    assert max_diff(after, before) > 1e-6

    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(build(name, task), tmp_path)
    with torch.no_grad():
        again = reloaded(**inputs)
    assert max_diff(again, after) == 0.0


@pytest.mark.parametrize(("name", "task"), [c for c in CASES if c[1] == "base" and c[0] != "tiny-clip"], ids=str)
def test_strip_registers_false_keeps_the_full_sequence(name, task):
    _, stripped = adapted(name, task)
    full = add_registers(copy.deepcopy(stripped.get_base_model()), NUM_REGISTERS, strip_registers=False)
    full.load_state_dict(stripped.state_dict())
    inputs = make_inputs(name)
    with torch.no_grad():
        short, long = stripped(**inputs).last_hidden_state, full(**inputs).last_hidden_state
    layout = token_layout(full)
    assert layout.num_registers == NUM_REGISTERS
    assert long.shape[1] == short.shape[1] + NUM_REGISTERS
    groups = split_tokens(long, full)
    assert groups.registers.shape[1] == layout.num_all_registers
    without_ours = torch.cat([groups.prefix, groups.registers[:, : layout.num_native_registers], groups.patches], 1)
    assert torch.equal(without_ours, short)


def test_hidden_states_keep_registers_for_the_residual_stream():
    base, model = adapted("tiny-dinov2", "base")
    inputs = make_inputs("tiny-dinov2")
    with torch.no_grad():
        plain = base(**inputs, output_hidden_states=True).hidden_states
        ours = model(**inputs, output_hidden_states=True).hidden_states
    assert len(ours) == len(plain) == 3
    assert [h.shape[1] for h in ours] == [h.shape[1] + NUM_REGISTERS for h in plain]
    # hidden_states[0] is the embedding output: the registers sit right after CLS, unchanged.
    registers = split_tokens(ours[0], model).registers
    layer = model.base_model.model.embeddings
    assert isinstance(layer, RegisterLayer)
    assert torch.equal(registers, layer.register_tokens["default"].expand(2, -1, -1))


def test_split_tokens_refuses_a_sequence_that_does_not_hold_the_registers():
    _, model = adapted("tiny-vit", "base")
    inputs = make_inputs("tiny-vit")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        model(pixel_values=torch.rand(1, 3, 44, 44), interpolate_pos_encoding=True)  # another size: 488 tokens
        with model.disable_adapter():
            plain = model(**inputs, output_hidden_states=True)
            inside = split_tokens(plain.hidden_states[-1], model)  # the layout of this pass: no registers
    assert torch.equal(inside.patches, plain.hidden_states[-1][:, 1:]) and inside.registers.shape[1] == 0
    assert torch.equal(split_tokens(out.hidden_states[-1], model).patches, out.hidden_states[-1][:, 4:])
    message = (
        "split_tokens got a sequence of 226 tokens, but the model's sequences with 3 added registers have 229 or 488 "
        "(4 before the patches): this one does not hold the registers where the layout puts them. Pass a sequence "
        "with every token, such as a hidden state (output_hidden_states=True) rather than last_hidden_state, from "
        "which registers are removed; for a forward pass under disable_adapter(), take its layout with "
        "token_layout(model) inside that block."
    )
    for without_registers in (out.last_hidden_state, plain.hidden_states[-1]):
        with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
            split_tokens(without_registers, model)


def test_multiple_adapters_each_with_its_own_register_count(tmp_path):
    base, model = adapted("tiny-vit", "base")
    inputs = make_inputs("tiny-vit")
    model.add_adapter("five", RegisterConfig(num_register_tokens=5, init="scaled_randn"))
    with torch.no_grad():
        first = model(**inputs).last_hidden_state
        model.set_adapter("five")
        assert token_layout(model).num_registers == 5
        second = model(**inputs, output_hidden_states=True)
    assert second.hidden_states[-1].shape[1] == 226 + 5
    assert float((first - second.last_hidden_state).abs().max()) > 1e-4

    model.save_pretrained(tmp_path, selected_adapters=["default", "five"])  # default in tmp_path, five in five/
    loaded = PeftModel.from_pretrained(build("tiny-vit", "base"), tmp_path / "five", adapter_name="five")
    loaded.load_adapter(tmp_path, adapter_name="other")
    assert loaded.active_adapters == ["five"]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, second.last_hidden_state)
        loaded.set_adapter("other")
        assert token_layout(loaded).num_registers == NUM_REGISTERS
        assert torch.equal(loaded(**inputs).last_hidden_state, first)

    model.delete_adapter("five")
    assert model.active_adapters == ["default"]
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, first)


def test_unload_restores_the_original_module_and_outputs():
    base, model = adapted("tiny-siglip2", "base")
    inputs = make_inputs("tiny-siglip2")
    restored = model.unload()
    assert type(restored.embeddings).__name__ == "Siglip2VisionEmbeddings"
    assert not any(isinstance(m, RegisterLayer) for m in restored.modules())
    with torch.no_grad():
        assert max_diff(restored(**inputs), base(**inputs)) == 0.0


def test_modules_to_save_trains_and_saves_a_new_head(tmp_path):
    _, model = adapted("tiny-dinov2", "classification", modules_to_save=["classifier"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.model.classifier.modules_to_save.default.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.dinov2.embeddings.register_tokens.default",
    ]
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert saved == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
        "base_model.model.dinov2.embeddings.register_tokens",
    ]


@pytest.mark.parametrize(("name", "task"), CASES, ids=CASE_IDS)
def test_mask_argument_is_the_mask_the_tower_forward_takes(name, task):
    tower = find_vision_tower(build(name, task))
    masks = [p for p in inspect.signature(tower.module.forward).parameters if p.endswith("attention_mask")]
    assert masks == ([tower.spec.mask_argument] if tower.spec.mask_argument else [])


SPATIAL = [
    ("tiny-dinov2", "backbone"),
    ("tiny-dinov2-with-registers", "backbone"),
    ("tiny-dinov3", "backbone"),
    ("tiny-vit", "masked-image-modeling"),
    ("tiny-vit-mae", "pretraining"),
]


@pytest.mark.parametrize(("name", "task"), SPATIAL, ids=[f"{n}-{t}" for n, t in SPATIAL])
def test_strip_registers_false_still_keeps_registers_out_of_the_patch_grid(name, task):
    """Feature maps and MIM/MAE decoders lay tokens out as patches: registers never go there. Everything else is the
    same as with stripped registers; a backbone's ``last_hidden_state`` (DINOv3) keeps them."""
    _, stripped = adapted(name, task)
    kept = add_registers(copy.deepcopy(stripped.get_base_model()), NUM_REGISTERS, strip_registers=False)
    kept.load_state_dict(stripped.state_dict())
    inputs = make_inputs(name)
    with torch.no_grad():
        short = stripped(**inputs, output_hidden_states=True)
        long = kept(**inputs, output_hidden_states=True)
    assert long.hidden_states[0].shape[1] == short.hidden_states[0].shape[1]  # both hold every token
    assert split_tokens(long.hidden_states[0], kept).registers.shape[1] == token_layout(kept).num_all_registers
    last = getattr(long, "last_hidden_state", None)
    if last is not None:
        prefix = find_vision_tower(kept).num_prefix_tokens
        assert last.shape[1] == short.last_hidden_state.shape[1] + NUM_REGISTERS
        assert torch.equal(
            torch.cat([last[:, :prefix], last[:, prefix + NUM_REGISTERS :]], 1), short.last_hidden_state
        )
        long.last_hidden_state = short.last_hidden_state
    assert shapes(long) == shapes(short)
    assert max_diff(long, short) == 0.0


MSN_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "image_size": 30,
    "patch_size": 2,
    "layer_norm_eps": 1e-6,  # ViT-MSN's default; ViT's is 1e-12
}


def test_register_family_declares_a_new_family_in_one_row(monkeypatch, tmp_path):
    """ViT-MSN is ViT's architecture under another model type: once declared, it must give exactly ViT's outputs."""
    monkeypatch.setattr(architectures, "FAMILIES", dict(architectures.FAMILIES))
    torch.manual_seed(0)
    msn = transformers.ViTMSNModel(transformers.ViTMSNConfig(**MSN_CONFIG)).eval()
    message = (
        f"ViTMSNModel (model_type='vit_msn') has no vision tower that register_adapter supports. Supported model "
        f"types: {', '.join(supported_model_types())}. To add a family, declare it with "
        "register_adapter.register_family(FamilySpec(...)) (see register_adapter/architectures.py)."
    )
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
        add_registers(copy.deepcopy(msn))

    spec = FamilySpec(
        name="vit_msn", model_types=("vit_msn",), layers="layers", strip_at="layernorm", mlp_out_proj=("mlp.fc2",)
    )
    assert architectures.register_family(spec) is spec
    assert "vit_msn" in supported_model_types()
    model = add_registers(copy.deepcopy(msn), NUM_REGISTERS, init="scaled_randn")
    vit = transformers.ViTModel(transformers.ViTConfig(**MSN_CONFIG), add_pooling_layer=False).eval()
    vit.load_state_dict(msn.state_dict())
    oracle = add_registers(vit, NUM_REGISTERS)
    oracle.load_state_dict(model.state_dict())
    inputs = make_inputs("tiny-vit")
    with torch.no_grad():
        got = model(**inputs, output_hidden_states=True)
        expected = oracle(**inputs, output_hidden_states=True)
        with model.disable_adapter():
            assert torch.equal(model(**inputs).last_hidden_state, msn(**inputs).last_hidden_state)
    assert got.last_hidden_state.shape == (2, 226, 32) and got.hidden_states[0].shape == (2, 229, 32)
    assert max_diff(got, expected) == 0.0

    model.save_pretrained(tmp_path)
    assert model.peft_config["default"].family == "vit_msn"
    reloaded = PeftModel.from_pretrained(copy.deepcopy(msn), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).last_hidden_state, got.last_hidden_state)

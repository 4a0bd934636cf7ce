"""The canonical adapter tests, over every supported family and head (tiny models built from configs)."""

import copy
import os

import pytest
import torch
from peft import PeftModel
from testing_common import CASE_IDS, CASES, build, make_inputs, max_diff, shapes, tensors

from register_adapter import RegisterLayer, add_registers, split_tokens, token_layout

NUM_REGISTERS = 3


def adapted(name, task, **kwargs):
    # Frozen like the adapted copy: nn.MultiheadAttention (SigLIP's pooling head) picks its kernel by requires_grad.
    base = build(name, task).requires_grad_(False)
    return base, add_registers(copy.deepcopy(base), NUM_REGISTERS, init="scaled_randn", **kwargs)


@pytest.mark.parametrize(("name", "task"), CASES, ids=CASE_IDS)
def test_outputs_keep_the_base_model_shapes(name, task):
    base, model = adapted(name, task)
    inputs = make_inputs(name)
    with torch.no_grad():
        expected, got = base(**inputs), model(**inputs)
    assert type(got) is type(expected)
    assert shapes(got) == shapes(expected)
    assert max_diff(got, expected) > 1e-4  # the registers take part in attention


@pytest.mark.parametrize(("name", "task"), CASES, ids=CASE_IDS)
def test_disable_adapter_gives_the_base_model_outputs(name, task):
    base, model = adapted(name, task)
    inputs = make_inputs(name)
    with torch.no_grad(), model.disable_adapter():
        got = model(**inputs)
    with torch.no_grad():
        expected = base(**inputs)
    assert max_diff(got, expected) == 0.0


@pytest.mark.parametrize(("name", "task"), CASES, ids=CASE_IDS)
def test_train_save_reload(name, task, tmp_path):
    _, model = adapted(name, task)
    inputs = make_inputs(name)
    with torch.no_grad():
        before = model(**inputs)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = sum(t.float().pow(2).mean() for t in tensors(model(**inputs)) if t.is_floating_point())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
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


def test_multiple_adapters_each_with_its_own_register_count(tmp_path):
    base, model = adapted("tiny-vit", "base")
    inputs = make_inputs("tiny-vit")
    from register_adapter import RegisterConfig

    model.add_adapter("five", RegisterConfig(num_register_tokens=5, init="scaled_randn"))
    with torch.no_grad():
        first = model(**inputs).last_hidden_state
        model.set_adapter("five")
        assert token_layout(model).num_registers == 5
        second = model(**inputs, output_hidden_states=True)
    assert second.hidden_states[-1].shape[1] == 226 + 5
    assert float((first - second.last_hidden_state).abs().max()) > 1e-4

    model.save_pretrained(tmp_path, selected_adapters=["five"])
    loaded = PeftModel.from_pretrained(build("tiny-vit", "base"), tmp_path / "five", adapter_name="five")
    loaded.load_adapter(tmp_path / "five", adapter_name="other")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, second.last_hidden_state)

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


@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-siglip2"])
def test_user_attention_mask_is_padded_for_the_registers(name):
    """Masked-out tokens must not influence the others: change their pixels, the rest of the output stays."""
    _, model = adapted(name, "base")
    inputs = make_inputs(name)
    key = "pixel_attention_mask" if name == "tiny-siglip2" else "attention_mask"
    length = 225 if name == "tiny-siglip2" else 226
    mask = torch.ones(2, length, dtype=torch.long)
    mask[:, -20:] = 0
    inputs[key] = mask
    changed = dict(inputs)
    if name == "tiny-siglip2":
        changed["pixel_values"] = inputs["pixel_values"].clone()
        changed["pixel_values"][:, -20:] += 5.0
    else:
        changed["pixel_values"] = inputs["pixel_values"].clone()
        changed["pixel_values"][..., -2:, -4:] += 5.0  # the last patches of the 15 x 15 grid
    with torch.no_grad():
        a = model(**inputs).last_hidden_state[:, :-20]
        b = model(**changed).last_hidden_state[:, :-20]
        unmasked = dict(inputs)
        unmasked.pop(key) if key == "attention_mask" else unmasked.update({key: torch.ones_like(mask)})
        c = model(**unmasked).last_hidden_state[:, :-20]
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def test_registers_follow_the_model_dtype_after_peft_upcasting():
    base = build("tiny-vit", "base").to(torch.bfloat16)
    model = add_registers(base, 2)
    assert model.base_model.model.embeddings.register_tokens["default"].dtype == torch.bfloat16
    with torch.no_grad():
        out = model(pixel_values=torch.rand(1, 3, 30, 30, dtype=torch.bfloat16))
    assert out.last_hidden_state.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-deit"])
def test_interpolate_pos_encoding_at_another_resolution(name):
    base, model = adapted(name, "base")
    x = torch.rand(2, 3, 44, 38)
    with torch.no_grad():
        got = model(pixel_values=x, interpolate_pos_encoding=True)
        expected = base(pixel_values=x, interpolate_pos_encoding=True)
        hidden = model(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[0]
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape
    assert hidden.shape[1] == expected.last_hidden_state.shape[1] + NUM_REGISTERS
    # Registers get no position embedding: in the embedding output they are exactly the learned tokens.
    assert torch.equal(
        split_tokens(hidden, model).registers,
        model.base_model.model.embeddings.register_tokens["default"].expand(2, -1, -1),
    )

"""The oracle: DINOv2 + our registers must reproduce transformers' native Dinov2WithRegisters models exactly."""

import pytest
import torch
from testing_common import max_diff

from register_adapter import find_vision_tower, from_dinov2_with_registers, to_dinov2_with_registers
from register_adapter.tiny import build_tiny_model

TASKS = {"base": "pooler_output", "classification": "logits", "backbone": "feature_maps"}
SIZES = [(30, 30), (44, 44), (30, 46)]


def native_model(task, attn="sdpa", num_register_tokens=4):
    overrides = {"num_labels": 3} if task == "classification" else {}
    model = build_tiny_model(
        "tiny-dinov2-with-registers", task, num_register_tokens=num_register_tokens, **overrides
    ).requires_grad_(False)
    model.set_attn_implementation(attn)
    torch.nn.init.normal_(find_vision_tower(model).embeddings.register_tokens)
    return model


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_converted_model_equals_the_native_model(task, size):
    native = native_model(task)
    model = from_dinov2_with_registers(native)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        assert max_diff(model(pixel_values=x)[TASKS[task]], native(x)[TASKS[task]]) <= 1e-6
        back = to_dinov2_with_registers(model)
        assert type(back) is type(native)
        assert max_diff(back(x), native(x)) == 0.0


@pytest.mark.parametrize("task", TASKS)
def test_plain_dinov2_base_is_exact_at_the_native_resolution(task):
    native = native_model(task)
    model = from_dinov2_with_registers(native, antialias=False)
    assert type(model.get_base_model()).__name__ == type(native).__name__.replace("WithRegisters", "")
    x = torch.rand(2, 3, 30, 30)
    with torch.no_grad():
        assert max_diff(model(pixel_values=x)[TASKS[task]], native(x)[TASKS[task]]) == 0.0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hidden_states_attentions_and_tuples_match_the_native_model(attn):
    native = native_model("base", attn)
    model = from_dinov2_with_registers(native)
    x = torch.rand(2, 3, 30, 30)
    kwargs = {"output_hidden_states": True, "output_attentions": attn == "eager"}
    with torch.no_grad():
        expected, got = native(x, **kwargs), model(pixel_values=x, **kwargs)
        as_tuple = model(pixel_values=x, return_dict=False)
    assert max_diff(got.hidden_states, expected.hidden_states) == 0.0
    if attn == "eager":
        assert len(got.attentions) == 2 and got.attentions[0].shape == (2, 4, 230, 230)
        assert max_diff(got.attentions, expected.attentions) == 0.0
    # Registers are removed from last_hidden_state; the native model keeps them (its heads skip them).
    cls_and_patches = torch.cat([expected.last_hidden_state[:, :1], expected.last_hidden_state[:, 5:]], dim=1)
    assert torch.equal(got.last_hidden_state, cls_and_patches)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], got.last_hidden_state)


def test_attention_mask_and_bool_masked_pos_match_the_native_model():
    native = native_model("base")
    model = from_dinov2_with_registers(native)
    x = torch.rand(2, 3, 30, 30)
    mask = torch.ones(2, 226, dtype=torch.long)
    mask[0, 100:] = 0
    native_mask = torch.cat([mask[:, :1], torch.ones(2, 4, dtype=torch.long), mask[:, 1:]], dim=1)
    masked_pos = torch.zeros(2, 225, dtype=torch.bool)
    masked_pos[:, ::7] = True
    with torch.no_grad():
        got = model(pixel_values=x, attention_mask=mask, bool_masked_pos=masked_pos).pooler_output
        expected = native(x, attention_mask=native_mask, bool_masked_pos=masked_pos).pooler_output
    assert max_diff(got, expected) == 0.0


def test_bf16_matches_the_native_model():
    native = native_model("classification").to(torch.bfloat16)
    model = from_dinov2_with_registers(native)
    x = torch.rand(2, 3, 30, 30, dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = model(pixel_values=x).logits, native(x).logits
    assert got.dtype == torch.bfloat16
    assert max_diff(got, expected) == 0.0


def test_extra_registers_follow_the_native_ones():
    from register_adapter import add_registers, split_tokens, token_layout

    native = native_model("base", num_register_tokens=2)
    model = add_registers(native, 3, strip_registers=False)
    layout = token_layout(model)
    assert (layout.num_prefix_tokens, layout.num_native_registers, layout.num_registers) == (1, 2, 3)
    with torch.no_grad():
        out = model(pixel_values=torch.rand(1, 3, 30, 30), output_hidden_states=True)
    registers = split_tokens(out.hidden_states[0], model).registers  # (1, 5, D)
    ours = model.base_model.model.embeddings.register_tokens["default"]
    assert torch.equal(registers[:, 2:], ours)
    assert torch.equal(registers[:, :2], native.embeddings.base_layer.register_tokens)
    exported = to_dinov2_with_registers(model)
    assert exported.config.num_register_tokens == 5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_converted_model_equals_the_native_model_on_cuda(attn, dtype):
    native = native_model("classification", attn).to("cuda", dtype)
    model = from_dinov2_with_registers(native)
    x = torch.rand(4, 3, 44, 44, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = native(x, output_hidden_states=True)
        got = model(pixel_values=x, output_hidden_states=True)
    assert got.logits.dtype == dtype and got.logits.device.type == "cuda"
    assert max_diff(got.hidden_states, expected.hidden_states) == 0.0
    assert max_diff(got.logits, expected.logits) == 0.0

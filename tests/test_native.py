"""The oracle: DINOv2 + our registers must reproduce transformers' native Dinov2WithRegisters models exactly."""

import re
import warnings

import pytest
import torch
from testing_common import max_diff, shapes

from register_adapter import (
    RegisterConfig,
    UnsupportedModelError,
    add_registers,
    find_vision_tower,
    from_dinov2_with_registers,
    to_dinov2_with_registers,
)
from register_adapter.tiny import build_tiny_model

TASKS = {"base": "pooler_output", "classification": "logits", "backbone": "feature_maps"}
SIZES = [(30, 30), (44, 44), (30, 46)]


ALL_STAGES = {"out_features": ["stem", "stage1", "stage2"]}


def native_model(task, attn="sdpa", num_register_tokens=4, **overrides):
    if task == "classification":
        overrides["num_labels"] = 3
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
        assert max_diff(model(pixel_values=x)[TASKS[task]], native(x)[TASKS[task]]) == 0.0
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
    from register_adapter import split_tokens, token_layout

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


def without(sequence, start, count):
    """``sequence`` (B, S, ...) without ``count`` tokens from ``start``."""
    return torch.cat([sequence[:, :start], sequence[:, start + count :]], dim=1)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_backbone_hidden_states_and_attentions_match_the_native_model(size):
    """Registers are removed only from the copy the feature maps are built from, as in the native backbone."""
    native = native_model("backbone", "eager", **ALL_STAGES)
    model = from_dinov2_with_registers(native)
    x = torch.rand(2, 3, *size)
    kwargs = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        expected, got = native(x, **kwargs), model(pixel_values=x, **kwargs)
        expected_tuple, got_tuple = native(x, return_dict=False), model(pixel_values=x, return_dict=False)
    assert shapes(got) == shapes(expected)
    grid, length = (size[0] // 2) * (size[1] // 2), 1 + 4 + (size[0] // 2) * (size[1] // 2)
    assert [h.shape[1] for h in got.hidden_states] == [length] * 3
    assert [a.shape[-1] for a in got.attentions] == [length] * 2
    assert [f.shape for f in got.feature_maps] == [(2, 32, size[0] // 2, size[1] // 2)] * 3 and grid
    assert max_diff(got, expected) == 0.0
    assert type(got_tuple) is tuple and len(got_tuple) == len(expected_tuple) == 1
    assert max_diff(got_tuple, expected_tuple) == 0.0


def test_backbone_attention_mask_and_selected_hidden_states_match_the_native_model():
    native = native_model("backbone", **ALL_STAGES)
    model = from_dinov2_with_registers(native)
    x = torch.rand(2, 3, 30, 30)
    mask = torch.ones(2, 226, dtype=torch.long)
    mask[0, ::4] = 0
    native_mask = torch.cat([mask[:, :1], torch.ones(2, 4, dtype=torch.long), mask[:, 1:]], dim=1)
    with torch.no_grad():
        expected = native(x, attention_mask=native_mask, output_hidden_states=[0, 2])
        got = model(pixel_values=x, attention_mask=mask, output_hidden_states=[0, 2])
    assert got.hidden_states[1] is None and [h.shape for h in got.hidden_states[::2]] == [(2, 230, 32)] * 2
    assert max_diff(got.feature_maps, expected.feature_maps) == 0.0
    assert max_diff(got.hidden_states[::2], expected.hidden_states[::2]) == 0.0


@pytest.mark.parametrize("strip_registers", [True, False])
def test_sequence_feature_maps_follow_strip_registers(strip_registers):
    """With ``reshape_hidden_states=False`` feature maps are sequences: registers stay unless stripped."""
    native = native_model("backbone", reshape_hidden_states=False)
    model = from_dinov2_with_registers(native)
    model.add_adapter("kept", RegisterConfig(num_register_tokens=4, strip_registers=strip_registers))
    model.set_adapter("kept")
    registers = find_vision_tower(model).embeddings.register_tokens
    with torch.no_grad():
        registers["kept"].copy_(registers["default"])
        x = torch.rand(2, 3, 30, 30)
        (got,), (expected,) = model(pixel_values=x).feature_maps, native(x).feature_maps
    assert expected.shape == (2, 230, 32)
    assert torch.equal(got, without(expected, 1, 4) if strip_registers else expected)


def dinov3_pair(task, attn="sdpa", strip_registers=True):
    """Native DINOv3 with 5 registers, and the same weights as DINOv3 with 2 native registers plus our 3."""
    native = build_tiny_model("tiny-dinov3", task, num_register_tokens=5).requires_grad_(False)
    native.set_attn_implementation(attn)
    registers = find_vision_tower(native).embeddings.register_tokens
    torch.nn.init.normal_(registers)
    torch.nn.init.normal_(find_vision_tower(native).embeddings.mask_token)
    base = build_tiny_model("tiny-dinov3", task).requires_grad_(False)
    base.set_attn_implementation(attn)
    state = native.state_dict()
    state["embeddings.register_tokens"] = registers[:, :2].clone()  # (1, 2, D): native registers first
    base.load_state_dict(state)
    model = add_registers(base, 3, init="zeros", strip_registers=strip_registers)
    with torch.no_grad():
        find_vision_tower(model).embeddings.register_tokens["default"].copy_(registers[:, 2:])  # then ours
    return native, model


DINOV3_SIZES = [(32, 32), (48, 48), (32, 56)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("size", DINOV3_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dinov3_with_extra_registers_equals_native_dinov3_with_all_of_them(size, attn):
    native, model = dinov3_pair("base", attn)
    x = torch.rand(2, 3, *size)
    grid = (size[0] // 4, size[1] // 4)
    masked_pos = torch.zeros(2, grid[0] * grid[1], dtype=torch.bool)
    masked_pos[0, ::3] = True
    kwargs = {"output_hidden_states": True, "output_attentions": attn == "eager"}
    for extra in ({}, {"bool_masked_pos": masked_pos}):
        with torch.no_grad():
            expected, got = native(x, **kwargs, **extra), model(pixel_values=x, **kwargs, **extra)
        assert [h.shape[1] for h in got.hidden_states] == [1 + 5 + grid[0] * grid[1]] * 3
        assert max_diff(got.hidden_states, expected.hidden_states) == 0.0
        if attn == "eager":
            assert max_diff(got.attentions, expected.attentions) == 0.0
        assert torch.equal(got.pooler_output, expected.pooler_output)
        # Our registers are removed from last_hidden_state; the native ones stay, as in the base model.
        assert torch.equal(got.last_hidden_state, without(expected.last_hidden_state, 3, 3))


@pytest.mark.parametrize("strip_registers", [True, False])
@pytest.mark.parametrize("size", DINOV3_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dinov3_backbone_with_extra_registers_equals_the_native_backbone(size, strip_registers):
    native, model = dinov3_pair("backbone", "eager", strip_registers=strip_registers)
    native.config.return_class_token = model.get_base_model().config.return_class_token = True
    x = torch.rand(2, 3, *size)
    kwargs = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        expected, got = native(x, **kwargs), model(pixel_values=x, **kwargs)
        expected_tuple, got_tuple = native(x, return_dict=False), model(pixel_values=x, return_dict=False)
    assert got.feature_maps[0].shape == (2, 32, size[0] // 4, size[1] // 4)
    assert shapes(got) == shapes(expected)
    assert max_diff(got, expected) == 0.0  # feature maps, class tokens, hidden states, attentions
    assert max_diff(got_tuple, expected_tuple) == 0.0
    last = expected.last_hidden_state
    assert torch.equal(got.last_hidden_state, without(last, 3, 3) if strip_registers else last)


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


def test_export_needs_an_active_register_adapter():
    model = from_dinov2_with_registers(native_model("base"))
    with model.disable_adapter(), pytest.raises(UnsupportedModelError) as error:
        to_dinov2_with_registers(model)
    assert str(error.value) == "to_dinov2_with_registers needs an active register adapter; none is active."


@pytest.mark.parametrize("task", TASKS)
def test_an_export_from_a_plain_dinov2_base_warns_that_only_its_image_size_is_exact(task):
    model = from_dinov2_with_registers(native_model(task), antialias=False)  # a Dinov2* base: no antialiasing
    name = type(model.get_base_model()).__name__
    message = (
        f"{name} interpolates position embeddings without antialiasing and the exported "
        f"{name.replace('Dinov2', 'Dinov2WithRegisters')} with it, as transformers' Dinov2WithRegisters models do: "
        "their outputs agree exactly only on 30x30 images (config.image_size) and differ on every other size. Run "
        "the exported model at that size, or keep the adapter for other sizes."
    )
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        exported = to_dinov2_with_registers(model)
    native_size, other_size = torch.rand(2, 3, 30, 30), torch.rand(2, 3, 30, 46)
    with torch.no_grad():
        assert max_diff(exported(native_size)[TASKS[task]], model(pixel_values=native_size)[TASKS[task]]) == 0.0
        assert max_diff(exported(other_size)[TASKS[task]], model(pixel_values=other_size)[TASKS[task]]) > 1e-4


def adapter_with_head_and_lora(task, lora_r):
    """A register adapter on the exact base (Dinov2WithRegisters without registers) with a trained head
    (classifier) and LoRA whose weights change the outputs."""
    overrides = {"num_labels": 3} if task == "classification" else {}
    base = build_tiny_model("tiny-dinov2-with-registers", task, num_register_tokens=0, **overrides)
    heads = ["classifier"] if task == "classification" else None
    model = add_registers(base, 4, init="scaled_randn", lora_r=lora_r, modules_to_save=heads)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, weight in model.named_parameters():
            if "lora_B" in key or "modules_to_save" in key:  # LoRA B starts at zero, the head's copy as the base's
                weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


EXPORTED_ADAPTERS = [("classification", 0), ("classification", 2), ("base", 2), ("backbone", 2)]


@pytest.mark.parametrize(("task", "lora_r"), EXPORTED_ADAPTERS, ids=[f"{t}-lora{r}" for t, r in EXPORTED_ADAPTERS])
def test_export_carries_the_trained_head_and_merged_lora(task, lora_r):
    model = adapter_with_head_and_lora(task, lora_r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact base: no warning
        exported = to_dinov2_with_registers(model)
    for size in SIZES:
        x = torch.rand(2, 3, *size)
        with torch.no_grad():
            difference = max_diff(exported(x)[TASKS[task]], model(pixel_values=x)[TASKS[task]])
        # Merging LoRA into the projection weights rounds differently from adding its output: about 1e-6 in fp32.
        assert difference == 0.0 if lora_r == 0 else difference < 1e-5

"""Bad input gets a typed error whose message says what was wrong and what to do."""

import re

import pytest
import transformers
from peft import PeftModel

from register_adapter import (
    AdapterMismatchError,
    InvalidConfigError,
    MergeNotSupportedError,
    RegisterAdapterError,
    RegisterConfig,
    UnsupportedModelError,
    add_registers,
    supported_model_types,
)
from register_adapter.tiny import build_tiny_model

SUPPORTED = (
    "aimv2_vision_model, clip_vision_model, deit, dinov2, dinov2_with_registers, dinov3_vit, ijepa, "
    "siglip2_vision_model, siglip_vision_model, vit, vit_mae"
)


def test_supported_model_types_is_the_family_table():
    assert ", ".join(supported_model_types()) == SUPPORTED


def test_a_model_without_a_supported_vision_tower_lists_the_supported_types():
    model = transformers.ResNetModel(transformers.ResNetConfig(hidden_sizes=[8, 8], depths=[1, 1], embedding_size=8))
    message = (
        "ResNetModel (model_type='resnet') has no vision tower that register_adapter supports. "
        f"Supported model types: {SUPPORTED}. To add a family, declare it with "
        "register_adapter.register_family(FamilySpec(...)) (see register_adapter/architectures.py)."
    )
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
        add_registers(model)


@pytest.mark.parametrize("name", ["tiny-beit", "tiny-data2vec-vision"])
def test_relative_position_bias_families_are_refused_with_the_reason(name):
    with pytest.raises(UnsupportedModelError, match=r"is not supported: .* relative position bias sized to exactly"):
        add_registers(build_tiny_model(name))


CONFIG_ERRORS = [
    *[
        ({"num_register_tokens": count}, f"num_register_tokens must be a positive int, got {count!r}. Papers use 4 "
         "(trained) or 16 (PH-Reg).")
        for count in (0, -1, 2.5, True, "4")
    ],
    *[({"lora_r": rank}, f"lora_r must be an int >= 0, got {rank!r}. 0 disables LoRA.") for rank in (-1, 1.5, True)],
    ({"init": "xavier"}, "init must be one of normal, zeros, scaled_randn, got 'xavier'."),
    ({"method": "magic"}, "method must be one of trained, distilled, test-time, got 'magic'."),
    ({"strip_registers": "no"}, "strip_registers must be True or False, got 'no'."),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), CONFIG_ERRORS, ids=[str(k) for k, _ in CONFIG_ERRORS])
def test_config_fields_are_checked(kwargs, message):
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        RegisterConfig(**kwargs)
    assert issubclass(InvalidConfigError, ValueError) and issubclass(InvalidConfigError, RegisterAdapterError)


def test_adapter_for_another_hidden_size_is_refused(tmp_path):
    add_registers(build_tiny_model("tiny-vit")).save_pretrained(tmp_path)
    wider = build_tiny_model("tiny-vit", hidden_size=48)
    message = (
        "This adapter was made for hidden_size=32, but the model has hidden_size=48 (ViTModel). "
        "Load it into a model of the same family and size."
    )
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_adapter_for_another_family_is_refused(tmp_path):
    add_registers(build_tiny_model("tiny-vit")).save_pretrained(tmp_path)
    message = (
        "This adapter was made for family='vit', but the model has family='dinov2' (Dinov2Model). "
        "Load it into a model of the same family and size."
    )
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(build_tiny_model("tiny-dinov2"), tmp_path)


def test_merge_and_unload_points_to_unload():
    model = add_registers(build_tiny_model("tiny-dinov2"))
    with pytest.raises(
        MergeNotSupportedError, match=r"^Register tokens are extra sequence positions.*model\.unload\(\)"
    ):
        model.merge_and_unload()


def test_unknown_tiny_model_lists_the_available_ones():
    with pytest.raises(UnsupportedModelError, match=r"^Unknown tiny model 'tiny-resnet'. Available: tiny-aimv2, "):
        build_tiny_model("tiny-resnet")

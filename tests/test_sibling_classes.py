"""An adapter belongs to the vision tower, not to the class around it: made on any class of a family, it loads into
any other class of that family with its registers and LoRA exact. A saved head the model has no place for is dropped
with a warning (or refused when asked); anything else that cannot be restored is an AdapterMismatchError."""

import copy
import itertools
import json
import re
import warnings

import pytest
import torch
from peft import PeftModel
from testing_common import UNSUPPORTED, build, make_inputs

from register_adapter import AdapterMismatchError, DroppedModulesWarning, add_registers, find_vision_tower
from register_adapter.loading import load_model
from register_adapter.tiny import TINY_MODELS, build_tiny_model
from register_adapter.training.classification import head_modules


def _families() -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, (_, _, tasks) in TINY_MODELS.items():
        if name not in UNSUPPORTED:
            family = "clip" if name.startswith("tiny-clip") else name  # CLIPModel and CLIPVisionModel: one tower
            groups.setdefault(family, []).extend((name, task) for task in tasks)
    return groups


SIBLINGS = [pair for members in _families().values() for pair in itertools.permutations(members, 2)]
SIBLING_IDS = [f"{a}-{ta}-to-{b}-{tb}" for (a, ta), (b, tb) in SIBLINGS]
X = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))


def trained_adapter(name: str, task: str, **config):
    """A register + LoRA adapter (with the head in modules_to_save for classifiers) whose weights all change the
    outputs, and the state of the tower it was made on."""
    model = build(name, task)
    tower_state = copy.deepcopy(find_vision_tower(model).module.state_dict())
    heads = head_modules(model) if "classification" in task else None
    adapted = add_registers(model, 3, init="scaled_randn", lora_r=2, modules_to_save=heads, **config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, weight in adapted.named_parameters():
            if "lora_B" in key:  # LoRA B starts at zero
                weight.copy_(torch.randn(weight.shape, generator=generator))
    return adapted, tower_state, heads


def with_tower(name: str, task: str, tower_state: dict) -> torch.nn.Module:
    """The model ``name``/``task`` holding the pretrained tower ``tower_state`` (a ViTModel's pooler is not in it)."""
    model = build(name, task)
    find_vision_tower(model).module.load_state_dict(tower_state, strict=False)
    return model


def tower_states(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    """Every hidden state of the vision tower, registers included."""
    inputs = {k: v for k, v in make_inputs(name).items() if k != "input_ids"}  # CLIP's text tower is not run
    with torch.no_grad():
        return find_vision_tower(model).module(**inputs, output_hidden_states=True).hidden_states


def dropped_warning(modules: list[str], target: str, source: str) -> str:
    one = len(modules) == 1
    return (
        f"The adapter's {', '.join(modules)} (modules_to_save) {'has' if one else 'have'} no place in {target} and "
        f"{'is' if one else 'are'} not loaded; the rest of the adapter is. To use {'it' if one else 'them'}, load the "
        f"adapter into a model that has {'it' if one else 'them'}, such as {source}."
    )


@pytest.mark.parametrize(("source", "target"), SIBLINGS, ids=SIBLING_IDS)
def test_an_adapter_loads_into_every_class_of_its_family_with_registers_and_lora_exact(source, target, tmp_path):
    adapted, tower_state, heads = trained_adapter(*source)
    adapted.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(with_tower(*target, tower_state), tmp_path)

    expected, found = tower_states(adapted, source[0]), tower_states(loaded, target[0])
    assert len(found) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(found, expected))
    dropped = [str(w.message) for w in caught if w.category is DroppedModulesWarning]
    source_class, target_class = type(adapted.get_base_model()).__name__, type(loaded.get_base_model()).__name__
    assert dropped == ([dropped_warning(heads, target_class, source_class)] if heads else [])


def test_an_adapter_moved_to_another_class_saves_for_that_class_and_moves_back(tmp_path):
    adapted, tower_state, _ = trained_adapter("tiny-dinov2", "base")
    adapted.save_pretrained(tmp_path / "model")
    classifier = PeftModel.from_pretrained(
        with_tower("tiny-dinov2", "classification", tower_state), tmp_path / "model"
    )
    classifier.save_pretrained(tmp_path / "classifier")
    assert json.loads((tmp_path / "classifier" / "adapter_config.json").read_text())["tower_path"] == "dinov2"
    back = PeftModel.from_pretrained(with_tower("tiny-dinov2", "base", tower_state), tmp_path / "classifier")
    assert all(
        torch.equal(a, b) for a, b in zip(tower_states(back, "tiny-dinov2"), tower_states(adapted, "tiny-dinov2"))
    )


def test_transformers_load_adapter_restores_lora_and_follows_the_tower(tmp_path):
    adapted, tower_state, _ = trained_adapter("tiny-dinov2", "classification")
    adapted.save_pretrained(tmp_path)
    same = build("tiny-dinov2", "classification")
    same.load_adapter(str(tmp_path), adapter_name="trained")
    with torch.no_grad():
        assert torch.equal(same(pixel_values=X).logits, adapted(pixel_values=X).logits)  # LoRA included
    bare = with_tower("tiny-dinov2", "base", tower_state)
    message = dropped_warning(["classifier"], "Dinov2Model", "Dinov2ForImageClassification")
    with pytest.warns(DroppedModulesWarning, match=f"^{re.escape(message)}$"):
        bare.load_adapter(str(tmp_path), adapter_name="trained")
    assert all(
        torch.equal(a, b) for a, b in zip(tower_states(bare, "tiny-dinov2"), tower_states(adapted, "tiny-dinov2"))
    )


def lora_adapter(folder, **overrides):
    model = add_registers(build_tiny_model("tiny-vit", **overrides), 2, lora_r=2)
    model.save_pretrained(folder)
    return model


def test_an_adapter_for_more_layers_than_the_model_has_is_refused(tmp_path):
    lora_adapter(tmp_path, num_hidden_layers=3)
    message = (
        "4 weights of the adapter have no place in ViTModel: layers.2.attention.q_proj.lora_A.weight, "
        "layers.2.attention.q_proj.lora_B.weight, layers.2.attention.v_proj.lora_A.weight, "
        "layers.2.attention.v_proj.lora_B.weight. Load it into a model of the architecture it was made for (ViTModel) "
        "or another class of that family."
    )
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(build_tiny_model("tiny-vit"), tmp_path)


def test_an_adapter_for_fewer_layers_than_the_model_has_is_refused_rather_than_left_untrained(tmp_path):
    lora_adapter(tmp_path)
    message = (
        "The adapter files hold no weights for 4 parameters that adapter 'default' has in ViTModel: "
        "layers.2.attention.q_proj.lora_A.default.weight, layers.2.attention.q_proj.lora_B.default.weight, "
        "layers.2.attention.v_proj.lora_A.default.weight, layers.2.attention.v_proj.lora_B.default.weight; they would "
        "stay freshly initialised. Load it into a model of the architecture it was made for (ViTModel)."
    )
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(build_tiny_model("tiny-vit", num_hidden_layers=3), tmp_path)
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        transformers_model = build_tiny_model("tiny-vit", num_hidden_layers=3)
        transformers_model.load_adapter(str(tmp_path))
    assert not transformers_model._hf_peft_config_loaded  # the half-loaded adapter is gone again


def test_a_head_of_another_size_is_refused_with_the_fix(tmp_path):
    model = add_registers(
        build_tiny_model("tiny-vit", "classification", num_labels=3), 2, modules_to_save=["classifier"]
    )
    model.save_pretrained(tmp_path)
    message = (
        "The adapter's weights do not fit ViTForImageClassification: classifier.modules_to_save.default.weight [3, 32] "
        "in the adapter, [5, 32] in the model; classifier.modules_to_save.default.bias [3] in the adapter, [5] in the "
        "model. Load it into a model of the size it was made for (ViTForImageClassification); for a classification "
        "head, load the base model with its number of labels."
    )
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=5), tmp_path)


def test_a_head_with_labels_sizes_the_model_and_names_its_classes(tmp_path):
    labels = ["cat", "dog", "fox"]
    model = add_registers(
        build_tiny_model("tiny-vit", "classification", num_labels=3), 2, modules_to_save=["classifier"], labels=labels
    )
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=5), tmp_path)
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    assert loaded.config.label2id == {"cat": 0, "dog": 1, "fox": 2}
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=X).logits, model(pixel_values=X).logits)


def test_modules_to_save_inside_the_tower_do_not_move_between_classes(tmp_path):
    add_registers(build_tiny_model("tiny-dinov2"), 2, modules_to_save=["layernorm"]).save_pretrained(tmp_path)
    message = (
        "This adapter trains modules inside the vision tower (dinov2.layernorm, modules_to_save) and was saved from a "
        "model whose tower is at ''; in Dinov2ForImageClassification it is at 'dinov2'. Load it into a model of the "
        "class it was saved from."
    )
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(message)}$"):
        PeftModel.from_pretrained(build_tiny_model("tiny-dinov2", "classification"), tmp_path)


def test_a_dropped_head_is_refused_when_asked_for(tmp_path):
    adapted, _, _ = trained_adapter("tiny-deit", "classification-with-teacher")
    adapted.save_pretrained(tmp_path)
    message = dropped_warning(
        ["cls_classifier", "distillation_classifier"],
        "DeiTForImageClassification",
        "DeiTForImageClassificationWithTeacher",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroppedModulesWarning)
        with pytest.raises(DroppedModulesWarning, match=f"^{re.escape(message)}$"):
            PeftModel.from_pretrained(build("tiny-deit", "classification"), tmp_path)
    refusal = f"{tmp_path} has no trained head for a classifier: {message}"
    with pytest.raises(AdapterMismatchError, match=f"^{re.escape(refusal)}$"):
        load_model("tiny-deit", "classification", adapter=str(tmp_path))

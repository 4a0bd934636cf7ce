"""Saving, loading and the Hub, offline: a push writes into a local Hub cache that a fresh process loads from."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from register_adapter import AdapterFilesError, add_registers
from register_adapter.tiny import build_tiny_model

X = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))


def trained_adapter(**kwargs):
    base = build_tiny_model("tiny-vit", "classification", num_labels=3)
    base.name_or_path = base.config._name_or_path = "org/tiny-vit"  # as from_pretrained("org/tiny-vit") sets them
    model = add_registers(base, 4, init="scaled_randn", modules_to_save=["classifier"], **kwargs)
    return model


def test_card_of_a_lora_adapter_names_its_rank_and_targets():
    from register_adapter.hub import render_model_card

    card = render_model_card(trained_adapter(lora_r=8, lora_alpha=32)).content
    assert "| LoRA in the same adapter | rank 8, alpha 32 on `q_proj`, `v_proj` |" in card


def test_card_of_an_adapter_with_labels_loads_it_in_one_line_without_sizing_the_head():
    from register_adapter.hub import render_model_card

    card = render_model_card(trained_adapter(labels=["cat", "dog", "fox"]), repo_id="org/regs").content
    assert 'base = ViTForImageClassification.from_pretrained("org/tiny-vit")\n' in card
    assert "The adapter holds its 3 class names" in card
    assert 'model = AutoModelForImageClassification.from_pretrained("org/regs")' in card
    assert 'classify = pipeline("image-classification", model="org/regs")' in card


@pytest.mark.parametrize("made_by", ["add_registers", "PeftModel.from_pretrained"])
def test_push_to_hub_uploads_adapter_and_our_card_in_one_commit(made_by, fake_hub, tmp_path):
    model = trained_adapter()
    if made_by == "PeftModel.from_pretrained":  # peft's own class: the behaviour is not tied to add_registers
        model.save_pretrained(tmp_path / "adapter")
        model = PeftModel.from_pretrained(
            build_tiny_model("tiny-vit", "classification", num_labels=3), tmp_path / "adapter"
        )
        assert type(model) is PeftModel
    model.card_metadata = {"metrics": {"eval_accuracy": 0.875}}
    model.push_to_hub("org/vit-registers", max_shard_size="1GB", use_temp_dir=True)  # arguments without a meaning

    assert fake_hub.commits == [
        ("org/vit-registers", ["README.md", "adapter_config.json", "adapter_model.safetensors"])
    ]
    card = (fake_hub.snapshot("org/vit-registers") / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny-vit\n")
    assert "# tiny-vit with 4 register tokens" in card
    assert "| register tokens | 4 |" in card
    assert "| eval_accuracy | 0.875 |" in card
    assert (
        'base = ViTForImageClassification.from_pretrained("org/tiny-vit", num_labels=3, ignore_mismatched_sizes=True)'
        in card
    )
    assert "[`org/tiny-vit`](https://huggingface.co/org/tiny-vit)" in card
    assert 'PeftModel.from_pretrained(base, "org/vit-registers")' in card
    assert "| trained and saved modules | `classifier` |" in card
    assert "LoRA" not in card
    assert "arxiv.org/abs/2309.16588" in card
    assert "library_name: peft" in card and "- register_adapter" in card


@pytest.mark.slow
def test_a_pushed_adapter_loads_from_the_hub_in_a_fresh_process(fake_hub, tmp_path):
    build_tiny_model("tiny-vit", "classification", num_labels=3).save_pretrained(fake_hub.snapshot("org/tiny-vit"))
    fake_hub.create_repo(None, "org/tiny-vit")
    model = trained_adapter()
    model.push_to_hub("org/vit-registers")
    with torch.no_grad():
        expected = model(pixel_values=X).logits
    save_file({"x": X, "expected": expected}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from peft import AutoPeftModel, PeftModel, PeftConfig
        from transformers import AutoModelForImageClassification
        import register_adapter

        data = load_file({str(tmp_path / "expected.safetensors")!r})
        base = AutoModelForImageClassification.from_pretrained("org/tiny-vit")
        model = PeftModel.from_pretrained(base, "org/vit-registers")
        auto = AutoPeftModel.from_pretrained("org/vit-registers")
        assert PeftConfig.from_pretrained("org/vit-registers").num_register_tokens == 4
        with torch.no_grad():
            for m in (model, auto):
                assert torch.equal(m(pixel_values=data["x"]).logits, data["expected"]), "outputs differ"
        print("restored", type(auto.get_base_model()).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(fake_hub.cache)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "restored ViTForImageClassification"


def test_save_is_atomic_an_interrupted_save_leaves_the_old_adapter(tmp_path):
    model = trained_adapter()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        old = model(pixel_values=X).logits
        model.base_model.model.vit.embeddings.register_tokens["default"].add_(1.0)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 64)
        raise KeyboardInterrupt

    with mock.patch("peft.peft_model.safe_save_file", crash), pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(build_tiny_model("tiny-vit", "classification", num_labels=3), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=X).logits, old)


@pytest.mark.slow
def test_reload_in_a_fresh_process_gives_identical_outputs(tmp_path):
    model = trained_adapter()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        save_file({"x": X, "expected": model(pixel_values=X).logits}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from peft import PeftModel
        import register_adapter
        from register_adapter.tiny import build_tiny_model

        data = load_file({str(tmp_path / "expected.safetensors")!r})
        base = build_tiny_model("tiny-vit", "classification", num_labels=3)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            print(float((model(pixel_values=data["x"]).logits - data["expected"]).abs().max()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "0.0"


def test_transformers_add_adapter_and_load_adapter(tmp_path):
    from testing_common import max_diff

    from register_adapter import RegisterConfig

    model = trained_adapter()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(pixel_values=X).logits
    base = build_tiny_model("tiny-vit", "classification", num_labels=3)
    base.load_adapter(str(tmp_path), adapter_name="regs")
    with torch.no_grad():
        assert torch.equal(base(pixel_values=X).logits, expected)
    fresh = build_tiny_model("tiny-vit", "base")
    fresh.add_adapter(RegisterConfig(num_register_tokens=2), adapter_name="two")
    assert fresh.active_adapters() == ["two"]
    with torch.no_grad():
        out = fresh(pixel_values=X, output_hidden_states=True)
    assert out.hidden_states[0].shape == (2, 228, 32) and out.last_hidden_state.shape == (2, 226, 32)
    fresh.delete_adapter("two")
    # The last adapter is gone: transformers reports none loaded, and the model is the base model again.
    assert not fresh._hf_peft_config_loaded
    with pytest.raises(ValueError, match="^No adapter loaded. Please load an adapter first.$"):
        fresh.active_adapters()
    with torch.no_grad():
        out = fresh(pixel_values=X, output_hidden_states=True)
        expected = build_tiny_model("tiny-vit", "base")(pixel_values=X, output_hidden_states=True)
    assert out.hidden_states[0].shape == (2, 226, 32)
    assert max_diff(out, expected) == 0.0


def test_missing_weights_file_is_a_typed_error(tmp_path):
    trained_adapter().save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    base = build_tiny_model("tiny-vit", "classification", num_labels=3)
    message = (
        f"^{tmp_path / 'adapter_model.safetensors'} is missing: the adapter folder holds only "
        r"\['README.md', 'adapter_config.json'\]. Save the adapter again with model.save_pretrained\(folder\).$"
    )
    with pytest.raises(AdapterFilesError, match=message):
        PeftModel.from_pretrained(base, tmp_path)


def test_corrupted_weights_file_is_a_typed_error(tmp_path):
    trained_adapter().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    base = build_tiny_model("tiny-vit", "classification", num_labels=3)
    with pytest.raises(AdapterFilesError, match="is not a readable safetensors file .* download or save the adapter"):
        PeftModel.from_pretrained(base, tmp_path)


def test_adapter_config_records_family_and_hidden_size(tmp_path):
    trained_adapter().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["family"], config["hidden_size"]) == ("REGISTERS", "vit", 32)
    assert (config["num_register_tokens"], config["target_modules"]) == (4, "vit\\.embeddings")

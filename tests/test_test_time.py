"""Test-time registers (arXiv 2506.08010): register neurons found on the planted models, the edit checked against a
per-image reference, artifacts gone with features kept, batch invariance, and the adapter's PEFT life cycle."""

import copy
import functools
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel
from testing_common import UNSUPPORTED, ForwardCounter, hidden_patch_norms, make_inputs, planted_model

from register_adapter import (
    AdapterMismatchError,
    DataError,
    InvalidConfigError,
    RegisterConfig,
    UnsupportedModelError,
    add_registers,
    add_test_time_registers,
    find_artifacts,
    find_register_neurons,
)
from register_adapter.architectures import FAMILIES, find_vision_tower
from register_adapter.diagnostics.thresholds import resolve_threshold
from register_adapter.hooks import capture
from register_adapter.methods.test_time import PUBLISHED, search
from register_adapter.testing import make_artifact_model, make_object_images
from register_adapter.tiny import TINY_MODELS, build_tiny_model
from register_adapter.tuner.neurons import RegisterNeuronLayer

PLANTED_FAMILIES = ["vit", "deit", "dinov2", "dinov2-with-registers", "clip-vision", "clip", "siglip", "ijepa"]


@functools.cache
def scenes(count: int = 16, seed: int = 5) -> np.ndarray:
    return make_object_images(count, 32, seed=seed).images


@functools.cache
def found(family: str):
    """``find_register_neurons`` with every setting chosen automatically, on 16 scenes."""
    planted = planted_model(family)
    return find_register_neurons(planted.model, planted.preprocess(scenes()), progress=False)


def planted_neurons(planted) -> list[tuple[int, int]]:
    """The planted neurons as (block, unit): ``ArtifactModel.neurons`` counts layers from 1."""
    return [(layer - 1, unit) for layer, unit in planted.neurons]


def adapted(family: str, **kwargs):
    """A copy of the planted model with test-time registers on its planted neurons."""
    planted = planted_model(family)
    return add_test_time_registers(copy.deepcopy(planted.model), planted_neurons(planted), **kwargs)


def tower_outputs(model, pixel_values):
    with torch.no_grad():
        return find_vision_tower(model).module(pixel_values=pixel_values, output_hidden_states=True)


# -- Algorithm 1 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", PLANTED_FAMILIES)
def test_the_planted_neurons_rank_first_and_the_chosen_settings_say_why(family):
    planted = planted_model(family)
    result = found(family)
    assert sorted(result) == sorted(planted_neurons(planted))
    assert result.top_layer == planted.layer - 1 and result.outlier_layer == 5 and result.top_k == 2
    assert result.outlier_blocks == [2, 3, 4, 5]
    assert result.reasons["outlier_layer"] == (
        "block 5: of the blocks whose output's patch-token norms split into two modes (2, 3, 4, 5), the one with the "
        f"most tokens in the high mode ({100 * result.outlier_fraction_before[5]:.2f} %)"
    )
    assert result.reasons["top_layer"] == (
        f"block {planted.layer - 1}: the first block whose output's patch-token norms split into two modes (the "
        "outliers appear there); the neurons that write them sit in it or before it"
    )
    assert result.reasons["top_k"].startswith(
        "2: the fewest best neurons whose edit leaves no outlier patch token at the blocks with outliers (2, 3, 4, 5) "
        "on the 16 images; the best 1 leave "
    )
    assert result.reasons["top_k"].endswith(
        f"; the features keep a mean cosine similarity of {result.feature_cosine:.4f} to the model's own (at least "
        "0.9)"
    )
    assert result.outlier_fraction_after == [0.0] * 6 and result.feature_cosine > 0.9999
    assert result.outlier_fraction_before[planted.layer - 1 :] == [result.outlier_fraction_before[-1]] * 4
    assert result.outlier_fraction_before[-1] > 0.01


@pytest.mark.parametrize("score", ["mean", "mean_abs"])
def test_scores_are_the_mean_activation_at_the_outliers_of_the_models_own_hidden_states(score):
    """The oracle shares no code with the search: outliers from ``output_hidden_states``, activations from one
    unbatched hook, the mean taken over all outlier positions."""
    planted = planted_model("vit")
    pixel_values = planted.preprocess(scenes())
    result = find_register_neurons(planted.model, pixel_values, score=score, top_k=2, batch_size=3, progress=False)
    norms = hidden_patch_norms(planted.model, pixel_values, planted.grid[0] * planted.grid[1])  # (L, B, N)
    outliers = norms[result.outlier_layer] > result.threshold.value  # (B, N)
    tower = find_vision_tower(planted.model)
    projections = [tower.mlp_out_proj(block) for block in tower.blocks[: result.top_layer + 1]]
    with torch.no_grad(), capture(inputs=projections) as captured:
        tower.module(pixel_values=pixel_values)
    expected = torch.stack([captured[p][:, 1:][outliers] for p in projections])  # (top_layer + 1, T, I)
    expected = (expected.abs() if score == "mean_abs" else expected).mean(1)
    assert result.num_outliers == int(outliers.sum())
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert result.ranking(2) == [(b, u, pytest.approx(float(expected[b, u]), rel=1e-6)) for b, u in result]


def test_top_k_is_the_fewest_neurons_that_leave_no_outliers():
    planted = make_artifact_model("dinov2", num_neurons=3)
    pixel_values = planted.preprocess(scenes())
    result = find_register_neurons(planted.model, pixel_values, progress=False)
    assert sorted(result) == sorted(planted_neurons(planted))
    fewer = find_register_neurons(planted.model, pixel_values, top_k=2, progress=False)
    assert fewer.reasons["top_k"] == "2: given" and max(fewer.outlier_fraction_after) > 0
    assert result.outlier_fraction_after == [0.0] * 6


def test_images_are_read_from_files_folders_datasets_and_tensors_alike(tmp_path):
    import datasets
    from PIL import Image

    planted = planted_model("dinov2")
    images = scenes()[:6]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(image) for image in images]})
    options = {"top_k": 2, "batch_size": 4, "processor": planted.processor, "progress": False}
    reference = find_register_neurons(planted.model, planted.preprocess(images), **options)

    class Reread:
        """Iterable, not a sequence: every pass reads it anew, one image at a time."""

        reads = 0

        def __iter__(self):
            Reread.reads += 1
            return (image for image in images)

    for source in (files, tmp_path, dataset, dataset.to_iterable_dataset(), Reread()):
        result = find_register_neurons(planted.model, source, **options)
        assert result.neurons == reference.neurons and result.num_outliers == reference.num_outliers
        torch.testing.assert_close(result.scores, reference.scores)
        assert result.outlier_fraction_after == reference.outlier_fraction_after
    assert Reread.reads == 3  # norms; outliers and scores; the edit
    with ForwardCounter(planted.model) as counter, pytest.raises(DataError) as error:
        find_register_neurons(planted.model, (image for image in images), **options)
    assert (str(error.value), counter.calls) == (
        "images is a one-shot iterator (generator), but find_register_neurons reads the images once per pass (three "
        "or more). Pass a list, a folder, a datasets dataset, or an object whose iter() starts over (a "
        "datasets.IterableDataset, a class with __iter__); it is read one batch at a time.",
        0,
    )


def test_the_streamed_statistics_give_the_thresholds_and_counts_of_all_norms_at_once():
    """The search keeps per-block statistics, not the norms: the thresholds and outlier counts are those computed
    from every norm of every image at once (the bimodal valley to within 0.01 %: its histogram has bins 0.024 % wide)."""
    planted = planted_model("dinov2")
    pixel_values = planted.preprocess(scenes())
    norms = hidden_patch_norms(planted.model, pixel_values, planted.grid[0] * planted.grid[1]).numpy()  # (L, B, N)
    for rule in ("auto", "mean+3std", 12.0):
        result = find_register_neurons(
            planted.model, pixel_values, threshold=rule, outlier_layer=5, top_layer=2, top_k=2, batch_size=3,
            progress=False,
        )  # fmt: skip
        exact = [resolve_threshold(rule, layer.ravel()).value for layer in norms]
        start = 0
        if rule == "auto":  # no second mode before the planted block
            assert exact[:2] == result.thresholds[:2] == [None, None] and result.outlier_blocks == [2, 3, 4, 5]
            start = 2
        assert result.thresholds[start:] == pytest.approx(exact[start:], rel=1e-4 if rule == "auto" else 1e-6)
        limits = np.array([np.inf if t is None else t for t in exact])
        counts = (norms > limits[:, None, None]).sum(axis=(1, 2))
        assert result.outlier_fraction_before == (counts / norms[0].size).tolist()
        assert result.num_outliers == counts[5] > 0


def test_mean_plus_3std_flags_every_block_but_the_layers_are_chosen_where_the_norms_split():
    planted = planted_model("vit")
    result = find_register_neurons(planted.model, planted.preprocess(scenes()), threshold="mean+3std", progress=False)
    assert min(result.outlier_fraction_before) > 0  # the rule flags tokens at every block, even before the artifacts
    assert (result.top_layer, result.outlier_layer, result.top_k) == (planted.layer - 1, 5, 2)
    assert sorted(result) == sorted(planted_neurons(planted))
    assert result.threshold.method == "mean+3std" and result.outlier_fraction_after[2:] == [0.0] * 4
    assert min(result.outlier_fraction_after[:2]) > 0  # not artifacts: they stay, and do not count against top_k


def test_top_layer_after_a_given_outlier_layer_is_clamped_to_it_with_the_reason():
    planted = planted_model("vit")
    pixel_values = planted.preprocess(scenes())
    norms = hidden_patch_norms(planted.model, pixel_values, planted.grid[0] * planted.grid[1])
    threshold = float(norms[1].flatten().quantile(0.99))  # block 1 splits into no two modes: the artifacts come later
    result = find_register_neurons(
        planted.model, pixel_values, outlier_layer=1, threshold=threshold, top_k=1, progress=False
    )
    assert result.top_layer == 1 and result.outlier_blocks == [2, 3, 4, 5]
    assert result.reasons["top_layer"] == (
        "block 1: no block up to outlier_layer 1 has patch-token norms that split into two modes; every block up to "
        "it is a candidate"
    )


def test_an_automatic_top_k_keeps_the_features_of_the_model():
    """``feature_cosine`` against an oracle that shares no code with the search, then the guard: an edit below
    MIN_FEATURE_COSINE is refused (raised here by asking for more than the planted edit keeps)."""
    planted = planted_model("dinov2")
    pixel_values = planted.preprocess(scenes())
    result = found("dinov2")
    model = add_test_time_registers(copy.deepcopy(planted.model), result)
    base, edited = (tower_outputs(m, pixel_values).last_hidden_state for m in (planted.model, model))
    norms = hidden_patch_norms(planted.model, pixel_values, planted.grid[0] * planted.grid[1])
    clean = norms[result.outlier_layer] <= result.threshold.value  # (B, N)
    cosine = torch.nn.functional.cosine_similarity(edited, base, dim=-1)  # (B, S)
    expected = min(float(cosine[:, 0].mean()), float(cosine[:, 1:][clean].mean()))
    assert result.feature_cosine == pytest.approx(expected, abs=1e-6) and expected < 1.0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search, "MIN_FEATURE_COSINE", 1.0)
        with pytest.raises(DataError) as error:
            find_register_neurons(planted.model, pixel_values, progress=False)
    assert str(error.value) == (
        "top_k=2, the fewest best neurons that leave no outlier patch token on the 16 images, changes the features: "
        f"their mean cosine similarity to the model's own is {result.feature_cosine:.4f}, below 1.0. Fewer neurons "
        "leave outliers. Check threshold (now 'auto') and outlier_layer, or pass top_k to take that many anyway."
    )


def test_no_automatic_top_k_that_leaves_no_outlier_is_an_error_that_says_what_to_pass(monkeypatch):
    planted = planted_model("vit")
    pixel_values = planted.preprocess(scenes())
    one = find_register_neurons(planted.model, pixel_values, top_k=1, progress=False)
    left = sum(
        round(one.outlier_fraction_after[b] * 16 * planted.grid[0] * planted.grid[1]) for b in one.outlier_blocks
    )
    assert left > 0
    monkeypatch.setattr(search, "MAX_AUTO_TOP_K", 1)
    with pytest.raises(DataError) as error:
        find_register_neurons(planted.model, pixel_values, progress=False)
    assert str(error.value) == (
        "No top_k up to 1 leaves the 16 images without outlier patch tokens at the blocks with outliers (2, 3, 4, 5); "
        f"top_k=1 leaves the fewest ({left}). Pass top_k (e.g. top_k=1) to take the best neurons anyway, a later "
        "top_layer (now 2) for more candidates, or another threshold (now 'auto')."
    )


# -- Algorithm 2: the edit ----------------------------------------------------------------------------------------------


def reference_edit(hidden, neurons, start, num_registers, mode, kept, native=range(0)):
    """Algorithm 2 image by image and neuron by neuron: (B, S, I) edited. The model's own registers (``native``
    positions) take no part: they keep their activation and give none."""
    edited = hidden.clone()
    others = [t for t in range(hidden.shape[1]) if t not in native]
    for b in range(hidden.shape[0]):
        units = [unit for unit, _ in neurons]
        if mode == "layer_max":
            values = hidden[b][others][:, units]
            peak_all = values.flatten()[values.abs().argmax()]
        for unit, index in neurons:
            peak = hidden[b, others, unit].max() if mode == "neuron_max" else peak_all
            edited[b, [t for t in others if t >= kept], unit] = 0.0
            edited[b, start + index % num_registers, unit] = peak
    return edited


def native_positions(tower) -> range:
    return range(tower.num_prefix_tokens - tower.num_native_registers, tower.num_prefix_tokens)


@pytest.mark.parametrize(
    ("family", "mode", "keep_cls", "num_registers"),
    [
        ("dinov2", "neuron_max", False, 1),
        ("deit", "neuron_max", True, 2),
        ("dinov2-with-registers", "layer_max", False, 2),
        ("siglip", "layer_max", True, 3),
    ],
)
def test_the_edit_is_algorithm_2_for_each_image(family, mode, keep_cls, num_registers):
    planted = planted_model(family)
    block = planted.layer - 1
    neurons = [(block, 7), *planted_neurons(planted), (block, 30), (block - 1, 3)]
    model = add_test_time_registers(copy.deepcopy(planted.model), neurons, num_registers, mode=mode, keep_cls=keep_cls)
    tower = find_vision_tower(model)
    layer = tower.mlp_out_proj(tower.blocks[block])
    assert isinstance(layer, RegisterNeuronLayer)
    pixel_values = planted.preprocess(scenes()[:3])
    with torch.no_grad(), capture(inputs=[layer, layer.base_layer]) as captured:
        model(pixel_values=pixel_values)
    prefix = {"deit": 2, "siglip": 0}.get(family, 1)
    start = tower.num_prefix_tokens  # after CLS, distillation token and native registers
    in_block = [(unit, index) for index, (b, unit) in enumerate(neurons) if b == block]
    kept = prefix if keep_cls else 0
    expected = reference_edit(captured[layer], in_block, start, num_registers, mode, kept, native_positions(tower))
    assert torch.equal(captured[layer.base_layer], expected)


SWIGLU = {"use_swiglu_ffn": True}  # DINOv2 ViT-g's MLP: gate_proj, up_proj -> SiLU gate -> down_proj


@pytest.mark.parametrize(
    ("name", "overrides"),
    [(name, {}) for name in TINY_MODELS if name not in UNSUPPORTED]
    + [("tiny-dinov2", SWIGLU), ("tiny-dinov2-with-registers", SWIGLU)],
)
def test_every_family_gets_the_edit_on_its_mlp_activation(name, overrides):
    """GELU and SwiGLU MLPs (DINOv3's down_proj, AIMv2's gated ffn, DINOv2's use_swiglu_ffn), every token layout, full
    CLIP, ViTMAE's masking: the hooked projection receives Algorithm 2's edit (disable_adapter, save and reload: the
    adapter matrix in test_adapter.py)."""
    model = build_tiny_model(name, **overrides).requires_grad_(False)  # frozen, as PEFT freezes it (MHA's fast path)
    inputs = make_inputs(name)
    model = add_test_time_registers(model, [(1, 3), (0, 5), (1, 7)], 2)
    assert not model.training  # the mode it was given, unlike get_peft_model
    tower = find_vision_tower(model)
    layer = tower.mlp_out_proj(tower.blocks[1])
    with torch.no_grad(), capture(inputs=[layer, layer.base_layer]) as captured:
        model(**inputs)
    start = tower.num_prefix_tokens
    edited = reference_edit(captured[layer], [(3, 0), (7, 2)], start, 2, "neuron_max", 0, native_positions(tower))
    assert torch.equal(captured[layer.base_layer], edited)
    if overrides:
        assert tower.mlp_out_proj_path(tower.blocks[1]) == "mlp.down_proj"


@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-dinov2-with-registers"])
def test_a_swiglu_dinov2_is_searched_at_its_gated_activation(name):
    """The scores are the mean of down_proj's input (the SiLU-gated product, 88 units wide for hidden size 32) at the
    patch tokens above a fixed threshold: the 1 % largest norms at the output of block 1."""
    model = build_tiny_model(name, **SWIGLU)
    pixel_values = make_inputs(name, batch_size=6)["pixel_values"]
    norms = hidden_patch_norms(model, pixel_values, 15 * 15)  # (L, B, N)
    threshold = float(norms[1].flatten().quantile(0.99))
    result = find_register_neurons(
        model, pixel_values, threshold=threshold, outlier_layer=1, top_layer=1, top_k=3, batch_size=4, progress=False
    )
    tower = find_vision_tower(model)
    projections = [block.mlp.down_proj for block in tower.blocks]
    with torch.no_grad(), capture(inputs=projections) as captured:
        tower.module(pixel_values=pixel_values)
    outliers = norms[1] > threshold  # (B, N)
    expected = torch.stack([captured[p][:, -15 * 15 :][outliers] for p in projections]).mean(1)  # (2, 88)
    assert expected.shape == (2, 88) and result.num_outliers == int(outliers.sum()) > 0
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)
    adapted = add_test_time_registers(copy.deepcopy(model), result)
    hooked = {name for name, module in adapted.named_modules() if isinstance(module, RegisterNeuronLayer)}
    assert hooked == {f"base_model.model.encoder.layer.{block}.mlp.down_proj" for block, _ in result}


@pytest.mark.parametrize("mode", ["neuron_max", "layer_max"])
def test_native_registers_keep_their_activation_and_the_test_time_register_is_added(mode):
    """Dinov2WithRegisters (2 native registers here): the register neurons' activation on the native registers, the
    largest of every unit here, stays where it is; the test-time register, after them, takes the largest over CLS and
    the patches."""
    model = add_test_time_registers(build_tiny_model("tiny-dinov2-with-registers"), [(1, 3), (1, 7)], mode=mode)
    tower = find_vision_tower(model)
    layer = tower.mlp_out_proj(tower.blocks[1])
    assert (layer.native, tower.num_prefix_tokens) == (slice(1, 3), 3)  # [CLS, native, native, ours, patches...]
    hidden = torch.randn(2, 3 + 1 + 225, layer.in_features, generator=torch.Generator().manual_seed(0))
    hidden[:, 1:3] += 100.0
    with torch.no_grad(), capture(inputs=[layer.base_layer]) as captured:
        layer(hidden)
    edited = captured[layer.base_layer]
    assert torch.equal(edited[:, 1:3], hidden[:, 1:3])
    others = torch.cat([hidden[:, :1], hidden[:, 3:]], dim=1)[..., [3, 7]]  # (2, 226, 2): CLS, ours, patches
    if mode == "neuron_max":
        peak = others.amax(dim=1)
    else:
        flat = others.flatten(1)
        peak = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True)).expand(-1, 2)
    assert torch.equal(edited[:, 3, [3, 7]], peak) and float(peak.max()) < 50
    assert not edited[:, 4:, [3, 7]].any() and not edited[:, 0, [3, 7]].any()


@pytest.mark.parametrize(
    ("family", "mode"), [("dinov2", "neuron_max"), ("clip", "layer_max"), ("ijepa", "neuron_max")]
)
def test_a_batch_gives_the_outputs_of_its_images_one_by_one(family, mode):
    """Exact in float64. In float32 the artifact tokens (values about 100) round differently in a batch than alone,
    by up to 1.5e-4 in the planted models without any adapter, so the bound there is 1e-5 of the largest value."""
    model = adapted(family, mode=mode, num_register_tokens=2)
    pixel_values = planted_model(family).preprocess(scenes()[:4])
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model, pixel_values = model.to(dtype), pixel_values.to(dtype)
        batch = tower_outputs(model, pixel_values)
        for i in range(len(pixel_values)):
            alone = tower_outputs(model, pixel_values[i : i + 1])
            pairs = [*zip(batch.hidden_states, alone.hidden_states, strict=True)]
            pairs.append((batch.last_hidden_state, alone.last_hidden_state))
            for together, single in pairs:
                scale = 1.0 if dtype == torch.float64 else float(single.abs().max())
                assert (together[i] - single[0]).abs().max() <= tolerance * scale


# -- the proof on the planted models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", PLANTED_FAMILIES)
def test_artifacts_move_to_the_register_and_features_stay(family):
    planted = planted_model(family)
    result = found(family)
    pixel_values = planted.preprocess(scenes(8, seed=11))  # other images than the neurons were found on
    model = add_test_time_registers(copy.deepcopy(planted.model), result)
    report = find_artifacts(model, pixel_values)
    native = find_vision_tower(model).num_native_registers
    assert report.num_registers == native + 1
    assert [layer.outlier_fraction for layer in report.layers] == [0.0] * 6
    strict = find_artifacts(model, pixel_values, threshold=result.threshold.value)  # the base model's threshold
    assert [layer.outlier_fraction for layer in strict.layers] == [0.0] * 6
    assert find_artifacts(planted.model, pixel_values, threshold=result.threshold.value).outlier_fraction > 0.01
    # The extra token carries the high norm from the planted block on.
    register_norms = [layer.register_norms[native] for layer in report.layers]
    block = planted.layer - 1
    assert max(register_norms[:block]) < result.threshold.value < min(register_norms[block:])

    base, ours, oracle = (tower_outputs(m, pixel_values) for m in (planted.model, model, planted.oracle))
    cosine = torch.nn.functional.cosine_similarity
    if find_vision_tower(model).spec.has_cls:
        assert cosine(ours.last_hidden_state[:, 0], base.last_hidden_state[:, 0], dim=-1).min() >= 0.99
    num_patches = planted.grid[0] * planted.grid[1]
    clean = ~planted.artifact_mask(pixel_values).flatten(1)  # (B, N): where the base model has no artifact
    patches, truth = ours.last_hidden_state[:, -num_patches:], oracle.last_hidden_state[:, -num_patches:]
    assert cosine(patches[clean], truth[clean], dim=-1).min() >= 0.99
    assert (~clean).sum() > 0


def test_disable_adapter_gives_the_base_model_exactly_and_unload_removes_every_hook():
    planted = planted_model("dinov2-with-registers")
    base = copy.deepcopy(planted.model)
    pixel_values = planted.preprocess(scenes()[:3])
    expected = tower_outputs(base, pixel_values)
    module_types = [type(m) for m in base.modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in base.modules()]
    model = add_test_time_registers(base, planted_neurons(planted), 2, keep_cls=True)
    assert not torch.equal(tower_outputs(model, pixel_values).hidden_states[-1], expected.hidden_states[-1])
    with model.disable_adapter():
        disabled = tower_outputs(model, pixel_values)
    restored = model.unload()
    unloaded = tower_outputs(restored, pixel_values)
    tower = find_vision_tower(restored)
    for outputs in (disabled, unloaded):
        for got, want in zip(outputs.hidden_states, expected.hidden_states, strict=True):
            assert torch.equal(got, want)
    assert [type(m) for m in restored.modules()] == module_types
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in restored.modules()] == hooks
    assert not hasattr(restored, "peft_config")
    assert type(tower.mlp_out_proj(tower.blocks[planted.layer - 1])) is torch.nn.Linear


def test_adapters_in_inference_mode_stay_frozen_after_disable_adapter(tmp_path):
    """PEFT's enable_adapters, run on leaving disable_adapter(), makes the active adapter trainable; an adapter in
    inference mode (test-time registers, or one loaded without is_trainable) keeps every weight frozen, a trainable
    one keeps exactly its trainable weights."""
    extras = {"lora_r": 2, "unlocked_weights": ["patch_embedding"]}
    test_time = add_test_time_registers(build_tiny_model("tiny-dinov2"), [(1, 3)], **extras)
    trained = add_registers(build_tiny_model("tiny-dinov2"), 2, **extras)
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny_model("tiny-dinov2"), tmp_path)

    def trainable(model) -> list[str]:
        return [name for name, parameter in model.named_parameters() if parameter.requires_grad]

    expected = trainable(trained)
    assert len(expected) == 11  # registers, patch-embedding copies (2), LoRA A and B on q and v in 2 blocks (8)
    for model, want in ((test_time, []), (loaded, []), (trained, expected)):
        assert trainable(model) == want
        with model.disable_adapter():
            assert trainable(model) == []
        assert trainable(model) == want


def test_adapters_switch_and_delete_like_any_peft_adapter():
    planted = planted_model("deit")
    block = planted.layer - 1
    first, second = planted_neurons(planted), [(block, 5), (block - 1, 9), *planted_neurons(planted)]
    model = add_test_time_registers(copy.deepcopy(planted.model), first)
    config = RegisterConfig(
        num_register_tokens=2, init="zeros", method="test-time", register_neurons=second, neuron_mode="layer_max"
    )
    model.add_adapter("other", config)
    pixel_values = planted.preprocess(scenes()[:3])
    alone = {
        "default": add_test_time_registers(copy.deepcopy(planted.model), first),
        "other": add_test_time_registers(copy.deepcopy(planted.model), second, 2, mode="layer_max"),
    }
    for name in ("other", "default", "other"):
        model.set_adapter(name)
        for got, want in zip(
            tower_outputs(model, pixel_values).hidden_states,
            tower_outputs(alone[name], pixel_values).hidden_states,
            strict=True,
        ):
            assert torch.equal(got, want)
    with pytest.warns(
        UserWarning, match="^Adapter other was active which is now deleted. Setting active adapter to default.$"
    ):
        model.delete_adapter("other")
    layer = find_vision_tower(model).mlp_out_proj(find_vision_tower(model).blocks[block])
    assert list(layer.register_units) == ["default"] and model.active_adapters == ["default"]


def test_the_adapter_pushes_with_its_neurons_and_loads_from_the_config_alone(fake_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub.cache))
    planted = planted_model("vit")
    result = found("vit")
    model = add_test_time_registers(copy.deepcopy(planted.model), result, 2, mode="layer_max")
    model.push_to_hub("org/vit-test-time")
    assert fake_hub.commits == [
        ("org/vit-test-time", ["README.md", "adapter_config.json", "adapter_model.safetensors"])
    ]
    loaded = PeftModel.from_pretrained(copy.deepcopy(planted.model), "org/vit-test-time")
    config = loaded.peft_config["default"]
    assert config.register_neurons == result.neurons and config.neuron_mode == "layer_max"
    assert config.num_register_tokens == 2 and config.method == "test-time"
    pixel_values = planted.preprocess(scenes()[:4])
    for got, want in zip(
        tower_outputs(loaded, pixel_values).hidden_states,
        tower_outputs(model, pixel_values).hidden_states,
        strict=True,
    ):
        assert torch.equal(got, want)
    card = (fake_hub.snapshot("org/vit-test-time") / "README.md").read_text()
    (block, first), (_, second) = result.neurons
    assert f"| {block} | {first}, {second} |" in card
    assert f"How the neurons were found: {result.source}." in card
    assert result.source == (
        f"find_register_neurons on 16 images: the top 2 of blocks 0-2 by mean activation at the {result.num_outliers} "
        f"patch tokens whose norm at the output of block 5 exceeds {result.threshold.value:.4g} (bimodal threshold)"
    )


def test_neurons_the_model_lacks_are_refused_at_load(tmp_path):
    make = functools.partial(build_tiny_model, "tiny-dinov2", hidden_size=32)
    add_test_time_registers(make(num_hidden_layers=4), [(3, 100), (1, 5), (2, 90)]).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError) as error:
        PeftModel.from_pretrained(make(num_hidden_layers=2), tmp_path)
    assert str(error.value) == (
        "2 of the 3 register neurons do not fit Dinov2Model (2 blocks, numbered from 0, of 128 MLP hidden units): "
        "(3, 100), (2, 90). They were found for another model: run register_adapter.find_register_neurons on this "
        "one."
    )
    with pytest.raises(AdapterMismatchError) as error:
        PeftModel.from_pretrained(make(num_hidden_layers=4, mlp_ratio=3), tmp_path)
    assert str(error.value).startswith(
        "1 of the 3 register neurons do not fit Dinov2Model (4 blocks, numbered from 0, of 96 MLP hidden units): "
        "(3, 100). They"
    )


def dinov2_large_on_meta(name_or_path: str, **overrides):
    """DINOv2 ViT-L/14's architecture without weights (the meta device), under ``name_or_path``."""
    from transformers import Dinov2Config, Dinov2Model

    sizes = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14}
    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**{**sizes, "image_size": 518, **overrides}))
    model.config._name_or_path = name_or_path
    return model


def published_hooks(model) -> dict[str, list[tuple[int, int]]]:
    return {
        name: module.register_units["default"]
        for name, module in model.named_modules()
        if isinstance(module, RegisterNeuronLayer)
    }


PUBLISHED_HOOKS = {
    f"base_model.model.encoder.layer.{block}.mlp.fc2": [
        (unit, 0) for b, unit in PUBLISHED["facebook/dinov2-large"].neurons if b == block
    ]
    for block in (17, 16, 15, 14, 13, 12)
}


def test_the_published_dinov2_large_neurons_hook_exactly_their_layers_and_units():
    model = add_test_time_registers(dinov2_large_on_meta("facebook/dinov2-large"))
    assert published_hooks(model) == PUBLISHED_HOOKS and sum(map(len, PUBLISHED_HOOKS.values())) == 45
    config = model.peft_config["default"]
    assert config.neuron_source.startswith("published with the paper's code (github.com/nickjiang2378/")


def test_published_neurons_are_found_for_a_copy_by_name_or_by_shape():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # named: no warning
        named = add_test_time_registers(dinov2_large_on_meta("/models/my-dinov2"), "facebook/dinov2-large")
    assert published_hooks(named) == PUBLISHED_HOOKS
    with pytest.warns(UserWarning) as warned:
        matched = add_test_time_registers(dinov2_large_on_meta("/models/my-dinov2"))
    assert published_hooks(matched) == PUBLISHED_HOOKS
    assert [str(w.message) for w in warned if w.category is UserWarning] == [
        "Using the register neurons published for facebook/dinov2-large: this model (/models/my-dinov2) has its shape "
        "(dinov2, 24 blocks, hidden size 1024, MLP width 4096, patch size 14). They fit a copy of its weights; for "
        "fine-tuned weights find the model's own with register_adapter.find_register_neurons(model, images)."
    ]


def test_published_neurons_for_another_shape_or_an_unknown_name_are_refused():
    cases = [
        (
            lambda: add_test_time_registers(dinov2_large_on_meta("/models/my-dinov2", patch_size=16)),
            InvalidConfigError,
            "No published register neurons for '/models/my-dinov2' (Dinov2Model: dinov2, 24 blocks, hidden size 1024, "
            "MLP width 4096, patch size 16); they are published for facebook/dinov2-large (dinov2, 24 blocks, hidden "
            "size 1024, MLP width 4096, patch size 14). Find them on a few hundred of your images: neurons = "
            "register_adapter.find_register_neurons(model, images), then add_test_time_registers(model, neurons).",
        ),
        (
            lambda: add_test_time_registers(dinov2_large_on_meta("x", num_hidden_layers=12), "facebook/dinov2-large"),
            AdapterMismatchError,
            "The register neurons published for facebook/dinov2-large fit its shape (dinov2, 24 blocks, hidden size "
            "1024, MLP width 4096, patch size 14), not this Dinov2Model (dinov2, 12 blocks, hidden size 1024, MLP "
            "width 4096, patch size 14). Find this model's own: register_adapter.find_register_neurons(model, "
            "images).",
        ),
        (
            lambda: add_test_time_registers(planted_model("vit").model, "facebook/dinov2-giant"),
            InvalidConfigError,
            "No register neurons are published for 'facebook/dinov2-giant'; they are published for "
            "facebook/dinov2-large.",
        ),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind) as error:
            call()
        assert str(error.value) == message


def test_a_model_without_published_neurons_is_told_to_find_them():
    model = planted_model("vit").model
    with pytest.raises(InvalidConfigError) as error:
        add_test_time_registers(model)
    assert str(error.value) == (
        "No published register neurons for 'this model' (ViTModel: vit, 6 blocks, hidden size 64, MLP width 256, "
        "patch size 2); they are published for facebook/dinov2-large (dinov2, 24 blocks, hidden size 1024, MLP width "
        "4096, patch size 14). Find them on a few hundred of your images: neurons = "
        "register_adapter.find_register_neurons(model, images), then add_test_time_registers(model, neurons)."
    )


# -- bad input ---------------------------------------------------------------------------------------------------------


def test_images_without_outliers_are_refused_with_the_threshold_and_layer():
    clean = build_tiny_model("tiny-vit")
    pixel_values = torch.rand(4, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError) as error:
        find_register_neurons(clean, pixel_values, progress=False)
    assert str(error.value) == (
        "No outlier patch tokens on the 4 images at any block output with threshold 'auto', so there is nothing to "
        "find register neurons from. Try more images (plain backgrounds bring artifacts out), another outlier_layer "
        "(artifacts appear from the middle blocks on), or a lower fixed threshold (150 for DINOv2 ViT-L); "
        "register_adapter.find_artifacts shows the norms of every layer."
    )
    planted = planted_model("vit")
    with pytest.raises(DataError, match=r"^No outlier patch tokens on the 16 images at the output of block 0 \("):
        find_register_neurons(planted.model, planted.preprocess(scenes()), outlier_layer=0, threshold=50.0)


def test_settings_are_checked_before_any_image_is_read():
    planted = planted_model("vit")
    pixel_values = planted.preprocess(scenes()[:2])
    cases = [
        (
            {"top_layer": 2, "top_k": 769},
            "top_k=769 is larger than the 768 candidate neurons (blocks 0-2, 256 MLP hidden units each). Ask for "
            "fewer, or pass a later top_layer.",
        ),
        (
            {"outlier_layer": 1, "top_layer": 2},
            "top_layer (2) comes after outlier_layer (1): neurons after the block where the outliers are read cannot "
            "have written them.",
        ),
        (
            {"outlier_layer": 6},
            "outlier_layer must be a block index in [0, 5] (or counting from the end, in [-6, -1]), or None to choose "
            "it from the images; got 6.",
        ),
        ({"top_k": 0}, "top_k must be a positive whole number, or None to choose it; got 0."),
        ({"score": "median"}, "score must be one of mean, mean_abs, got 'median'."),
        ({"mode": "max"}, "mode must be one of neuron_max, layer_max, got 'max'."),
    ]
    for kwargs, message in cases:
        with ForwardCounter(planted.model) as counter, pytest.raises(InvalidConfigError) as error:
            find_register_neurons(planted.model, pixel_values, progress=False, **kwargs)
        assert (str(error.value), counter.calls) == (message, 0)


def test_top_k_above_the_candidates_is_refused_once_top_layer_is_known():
    planted = planted_model("vit")
    with ForwardCounter(planted.model) as counter, pytest.raises(InvalidConfigError) as error:
        find_register_neurons(planted.model, planted.preprocess(scenes()[:8]), top_k=1000, progress=False)
    assert str(error.value) == (
        "top_k=1000 is larger than the 768 candidate neurons (blocks 0-2, 256 MLP hidden units each). Ask for fewer, "
        "or pass a later top_layer."
    )
    assert counter.calls == 1  # the norms only: top_layer is chosen from them


def test_images_of_different_sizes_are_refused():
    from transformers import ViTImageProcessorPil

    planted = planted_model("vit")
    images = [scenes()[0], scenes()[1][:30, :30]]
    processor = ViTImageProcessorPil(do_resize=False)
    with pytest.raises(
        DataError, match=r"^Images must all have one size after preprocessing: image 1 is 30x30 pixels"
    ):
        find_register_neurons(planted.model, images, processor=processor, progress=False)


def test_a_family_without_an_mlp_output_projection_is_refused(monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(FAMILIES, "vit", replace(FAMILIES["vit"], mlp_out_proj=("mlp.missing",)))
    model = planted_model("vit").model
    message = (
        "No MLP output projection found in ViTLayer at any of ['mlp.missing']. Test-time registers edit the input of "
        "the MLP output projection: declare where it is in the family's FamilySpec.mlp_out_proj "
        "(register_adapter.register_family)."
    )
    for call in (
        lambda: find_register_neurons(model, torch.zeros(1, 3, 32, 32)),
        lambda: add_test_time_registers(model, [(1, 2)]),
    ):
        with pytest.raises(UnsupportedModelError) as error:
            call()
        assert str(error.value) == message


def test_a_model_with_adapters_is_refused():
    model = add_registers(build_tiny_model("tiny-vit"), 1)
    with pytest.raises(InvalidConfigError, match=r"^find_register_neurons needs the model without adapters, "):
        find_register_neurons(model, torch.zeros(1, 3, 30, 30))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"register_neurons": []},
            "register_neurons must be a non-empty list of (block, unit) pairs, or None for no "
            "test-time registers; got [].",
        ),
        (
            {"register_neurons": [(1, -2)]},
            "Each register neuron must be a (block, unit) pair of whole numbers >= 0 "
            "(0-based block of the vision tower, hidden unit of its MLP); got (1, -2).",
        ),
        ({"register_neurons": [(1, 2), (3, 4), (1, 2)]}, "register_neurons lists (1, 2) more than once."),
        (
            {"register_neurons": [(1, 2)], "method": "trained"},
            "register_neurons belong to test-time registers: set "
            "method='test-time' (got 'trained'), or use register_adapter.add_test_time_registers, which does.",
        ),
        ({"neuron_mode": "sign_max"}, "neuron_mode must be one of neuron_max, layer_max, got 'sign_max'."),
        ({"keep_cls": "yes"}, "keep_cls must be True or False, got 'yes'."),
    ],
)
def test_test_time_config_fields_are_checked(kwargs, message):
    with pytest.raises(InvalidConfigError) as error:
        RegisterConfig(**{"method": "test-time", **kwargs})
    assert str(error.value) == message


def test_lora_on_the_projection_the_neurons_feed_is_refused():
    planted = planted_model("vit")
    with pytest.raises(InvalidConfigError) as error:
        add_test_time_registers(copy.deepcopy(planted.model), [(2, 1)], lora_r=2, lora_target_modules=["fc2"])
    assert str(error.value) == (
        "lora_target_modules includes layers.2.mlp.fc2, the MLP output projection the register neurons feed; "
        "choose other LoRA targets (e.g. the attention projections)."
    )

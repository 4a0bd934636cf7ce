"""Every output of every family against an oracle: the unadapted model with the same registers put in by hand.

The reference below inserts the tokens with a plain forward hook after the embeddings, removes them with another from
the output of the module that gives ``last_hidden_state``, and pads a user mask by hand. Our adapter must give the
same tensors, exactly: ``hidden_states``, ``attentions`` (eager), ``return_dict=False``, a user attention mask,
``bool_masked_pos`` and ``interpolate_pos_encoding``. Backbones are checked against transformers' native register
models in ``test_native.py``.
"""

import contextlib
import copy
import functools
import inspect

import pytest
import torch
import transformers
from testing_common import CASES, build, make_inputs, max_diff, shapes

from register_adapter import add_registers, find_vision_tower
from register_adapter.tiny import TINY_MODELS, build_tiny_model, tiny_config

R = 3
# Tokens before the registers (DESIGN.md §3): CLS, DeiT's distillation token, native registers.
PREFIX = {
    "tiny-vit": 1,
    "tiny-deit": 2,
    "tiny-dinov2": 1,
    "tiny-dinov2-with-registers": 1 + 2,
    "tiny-dinov3": 1 + 2,
    "tiny-clip-vision": 1,
    "tiny-clip": 1,
    "tiny-siglip": 0,
    "tiny-siglip2": 0,
    "tiny-ijepa": 0,
    "tiny-vit-mae": 1,
    "tiny-aimv2": 0,
}
MASK_KEYS = ("attention_mask", "pixel_attention_mask")
HEADS = [c for c in CASES if c[1] != "backbone"]


def ids(cases):
    return [f"{name}-{task}" for name, task in cases]


def accepts(case, argument):
    name, task = case
    return argument in inspect.signature(getattr(transformers, TINY_MODELS[name][2][task]).forward).parameters


@functools.cache
def mask_argument(name):
    return find_vision_tower(build_tiny_model(name)).spec.mask_argument


def pad(mask, prefix):
    """A user mask (B, S) padded by hand for R registers after ``prefix`` tokens."""
    return torch.cat([mask[:, :prefix], mask.new_ones(mask.shape[0], R), mask[:, prefix:]], dim=1)  # (B, S + R)


@contextlib.contextmanager
def reference_registers(model, tokens, prefix):
    """Put ``tokens`` (1, R, D) into the unadapted ``model`` with plain hooks, and take them out again."""
    tower = find_vision_tower(model)

    def insert(x):
        return torch.cat([x[:, :prefix], tokens.expand(x.shape[0], -1, -1), x[:, prefix:]], dim=1)

    def remove(x):
        return torch.cat([x[:, :prefix], x[:, prefix + R :]], dim=1)

    def after_embeddings(module, args, output):
        return (insert(output[0]), *output[1:]) if isinstance(output, tuple) else insert(output)  # ViTMAE: a tuple

    def after_last_layer(module, args, output):
        if isinstance(output, torch.Tensor):
            return remove(output)
        output.last_hidden_state = remove(output.last_hidden_state)
        return output

    def before_pooling_head(module, args, kwargs):  # SigLIP2's head gets the (padded) pixel_attention_mask
        if len(args) > 1 and args[1] is not None:
            args = (args[0], remove(args[1]), *args[2:])
        return args, kwargs

    handles = [
        tower.embeddings.register_forward_hook(after_embeddings),
        tower.submodule(tower.spec.strip_at).register_forward_hook(after_last_layer),
    ]
    if tower.spec.unpad_mask_at:
        handles.append(tower.submodule("head").register_forward_pre_hook(before_pooling_head, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pair(name, task, attn="sdpa", base=None):
    """The unadapted model and a copy with R random registers, both frozen."""
    base = (base if base is not None else build(name, task)).requires_grad_(False)
    base.set_attn_implementation(attn)
    model = add_registers(copy.deepcopy(base), R, init="scaled_randn")
    tokens = find_vision_tower(model).embeddings.register_tokens["default"].detach()
    return base, model, tokens


def run_both(name, base, model, tokens, inputs, **kwargs):
    """(ours, reference) outputs for the same inputs; the reference gets the user mask padded by hand."""
    reference_inputs = {k: pad(v, PREFIX[name]) if k in MASK_KEYS else v for k, v in inputs.items()}
    with torch.no_grad():
        got = model(**inputs, **kwargs)
        with reference_registers(base, tokens, PREFIX[name]):
            expected = base(**reference_inputs, **kwargs)
    return got, expected


def assert_same(got, expected):
    assert type(got) is type(expected)
    assert shapes(got) == shapes(expected)
    assert max_diff(got, expected) == 0.0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("name", "task"), HEADS, ids=ids(HEADS))
def test_every_output_equals_the_reference(name, task, attn):
    base, model, tokens = pair(name, task, attn)
    inputs = make_inputs(name)
    kwargs = {"output_hidden_states": True, "output_attentions": attn == "eager"}
    got, expected = run_both(name, base, model, tokens, inputs, **kwargs)
    assert_same(got, expected)
    with torch.no_grad():
        plain = base(**inputs, output_hidden_states=True)
    # CLIPModel: the vision tower's own output.
    vision, plain = (getattr(o, "vision_model_output", o) for o in (got, plain))
    length = plain.hidden_states[0].shape[1] + R
    assert [h.shape[1] for h in vision.hidden_states] == [length] * 3
    if attn == "eager":
        assert [tuple(a.shape) for a in vision.attentions] == [(2, 4, length, length)] * 2


@pytest.mark.parametrize(("name", "task"), HEADS, ids=ids(HEADS))
def test_eager_and_sdpa_agree(name, task):
    inputs = make_inputs(name)
    eager, sdpa = pair(name, task, "eager")[1], pair(name, task, "sdpa")[1]
    sdpa.load_state_dict(eager.state_dict())
    with torch.no_grad():
        assert max_diff(eager(**inputs, output_hidden_states=True), sdpa(**inputs, output_hidden_states=True)) <= 1e-5


@pytest.mark.parametrize(("name", "task"), CASES, ids=ids(CASES))
def test_return_dict_false_gives_the_same_tensors_as_a_tuple(name, task):
    base, model, _ = pair(name, task)
    inputs = make_inputs(name)
    with torch.no_grad():
        as_dict = model(**inputs, output_hidden_states=True)
        as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
        base_tuple = base(**inputs, output_hidden_states=True, return_dict=False)
    assert type(as_tuple) is tuple and len(as_tuple) == len(base_tuple) == len(as_dict.to_tuple())
    assert shapes(as_tuple) == shapes(as_dict)
    assert max_diff(as_tuple, as_dict) == 0.0


MASKED = [c for c in HEADS if mask_argument(c[0]) is not None and accepts(c, mask_argument(c[0]))]


def test_the_attention_mask_matrix_covers_every_family_whose_forward_takes_one():
    assert sorted({name for name, _ in MASKED}) == [
        "tiny-deit",
        "tiny-dinov2",
        "tiny-dinov2-with-registers",
        "tiny-ijepa",
        "tiny-siglip2",
        "tiny-vit",
        "tiny-vit-mae",
    ]


@pytest.mark.parametrize(("name", "task"), MASKED, ids=ids(MASKED))
def test_user_attention_mask_is_padded_for_the_registers(name, task):
    base, model, tokens = pair(name, task)
    inputs = make_inputs(name)
    key = mask_argument(name)
    with torch.no_grad():
        length = base(**inputs, output_hidden_states=True).hidden_states[0].shape[1]  # ViTMAE: CLS + kept patches
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    mask[1, ::3] = 0  # CLS included: the registers must go after it
    got, expected = run_both(name, base, model, tokens, {**inputs, key: mask})
    assert_same(got, expected)
    with torch.no_grad():
        unmasked = model(**{**inputs, key: torch.ones_like(mask)})
    assert max_diff(got, unmasked) > 1e-3  # the mask is not ignored


INTERPOLATED = [c for c in HEADS if accepts(c, "interpolate_pos_encoding")]


def test_the_interpolation_matrix_covers_every_family_whose_forward_takes_it():
    assert sorted({name for name, _ in INTERPOLATED}) == [
        "tiny-clip",
        "tiny-clip-vision",
        "tiny-deit",
        "tiny-ijepa",
        "tiny-siglip",
        "tiny-vit",
        "tiny-vit-mae",
    ]


@pytest.mark.parametrize(("name", "task"), INTERPOLATED, ids=ids(INTERPOLATED))
def test_interpolate_pos_encoding_at_another_resolution_equals_the_reference(name, task):
    base, model, tokens = pair(name, task)
    height, width = (44, 44) if task == "masked-image-modeling" else (44, 38)  # ViT MIM needs a square grid
    inputs = {**make_inputs(name), "pixel_values": torch.rand(2, 3, height, width)}
    if "noise" in inputs:
        inputs["noise"] = torch.rand(2, (height // 2) * (width // 2))
    kwargs = {"interpolate_pos_encoding": True, "output_hidden_states": True}
    got, expected = run_both(name, base, model, tokens, inputs, **kwargs)
    assert_same(got, expected)
    # The embedding output is the base model's, with the registers in between: they get no position embedding
    # (CLIP's first hidden state comes after its pre-layernorm, which runs on every token).
    with torch.no_grad():
        plain = base(**inputs, **kwargs)
    ours, theirs = (getattr(o, "vision_model_output", o).hidden_states[0] for o in (got, plain))
    prefix = PREFIX[name]
    assert torch.equal(torch.cat([ours[:, :prefix], ours[:, prefix + R :]], dim=1), theirs)
    pre_layernorm = getattr(find_vision_tower(base).module, "pre_layrnorm", torch.nn.Identity())
    assert torch.equal(ours[:, prefix : prefix + R], pre_layernorm(tokens).expand(2, -1, -1))


# Every case whose forward takes ``bool_masked_pos``, built with a mask token (ViT MIM: ``encoder_stride`` = patch
# size, so that its reconstruction has the image's size and a loss can be computed).
MASKED_IMAGE_MODELS = {
    ("tiny-vit", "base"): lambda: transformers.ViTModel(tiny_config("tiny-vit"), use_mask_token=True),
    ("tiny-vit", "masked-image-modeling"): lambda: build_tiny_model(
        "tiny-vit", "masked-image-modeling", encoder_stride=2
    ),
    ("tiny-deit", "base"): lambda: transformers.DeiTModel(tiny_config("tiny-deit"), use_mask_token=True),
    ("tiny-ijepa", "base"): lambda: transformers.IJepaModel(tiny_config("tiny-ijepa"), use_mask_token=True),
    ("tiny-dinov2", "base"): lambda: build_tiny_model("tiny-dinov2"),
    ("tiny-dinov2-with-registers", "base"): lambda: build_tiny_model("tiny-dinov2-with-registers"),
    ("tiny-dinov3", "base"): lambda: build_tiny_model("tiny-dinov3"),
}


def test_the_bool_masked_pos_matrix_covers_every_case_whose_forward_takes_it():
    assert sorted(c for c in CASES if accepts(c, "bool_masked_pos")) == sorted(MASKED_IMAGE_MODELS)


@pytest.mark.parametrize(("name", "task"), MASKED_IMAGE_MODELS, ids=ids(MASKED_IMAGE_MODELS))
def test_bool_masked_pos_equals_the_reference(name, task):
    torch.manual_seed(0)
    base = MASKED_IMAGE_MODELS[name, task]().eval()
    torch.nn.init.normal_(find_vision_tower(base).embeddings.mask_token)
    base, model, tokens = pair(name, task, base=base)
    inputs = make_inputs(name)
    grid = find_vision_tower(base).config.image_size // find_vision_tower(base).patch_size
    masked_pos = torch.zeros(2, grid * grid, dtype=torch.bool)
    masked_pos[0, ::5] = True
    masked_pos[1, : grid * 3] = True
    got, expected = run_both(name, base, model, tokens, {**inputs, "bool_masked_pos": masked_pos})
    assert_same(got, expected)
    with torch.no_grad():
        unmasked = model(**inputs)
    if task == "masked-image-modeling":
        assert got.loss is not None and got.reconstruction.shape == (2, 3, 30, 30)
        assert max_diff(got.reconstruction, unmasked.reconstruction) > 1e-3  # the mask is not ignored
    else:
        assert max_diff(got.last_hidden_state, unmasked.last_hidden_state) > 1e-3

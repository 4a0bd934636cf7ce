"""The planted-artifact models behave like trained ViTs where later features depend on it: ~2 % artifact tokens,
10-20x the median norm, appearing at the planted layer, roughly shift- and flip-equivariant features, and an oracle
without the write."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from testing_common import hidden_patch_norms, planted_model

from register_adapter import find_vision_tower
from register_adapter.diagnostics.discovery import patch_features
from register_adapter.errors import UnsupportedModelError
from register_adapter.testing import (
    FULL_STRENGTH_FRACTION,
    PLANTABLE_FAMILIES,
    make_artifact_model,
    make_object_images,
)


@pytest.fixture(scope="module")
def scene():
    return make_object_images(8, 32, seed=7)


@pytest.fixture(params=PLANTABLE_FAMILIES)
def planted(request):
    return planted_model(request.param)


def patch_norms(model, pixel_values):
    """(L, B, N) patch-token norms at every block output, from the model's own hidden states."""
    return hidden_patch_norms(model, pixel_values, 16 * 16)


def test_artifacts_are_rare_huge_and_appear_at_the_planted_layer(planted, scene):
    pixel_values = planted.preprocess(scene.images)
    truth = planted.artifact_mask(pixel_values).flatten(1)  # (B, N)
    assert 0.01 <= truth.float().mean() <= 0.04
    norms = patch_norms(planted.model, pixel_values)  # (L, B, N)
    for layer, layer_norms in enumerate(norms, start=1):
        ratio = layer_norms / layer_norms[~truth].median()
        if layer < planted.layer:
            assert ratio.max() < 4.0, layer  # no outlier before the planted layer
        else:
            assert ratio[truth].min() >= 10.0 and ratio[truth].max() <= 20.0, layer
            assert ratio[~truth].max() < 4.0, layer
    # The ground-truth positions are exactly the tokens that stand out where the artifacts are written.
    written = norms[planted.layer - 1].reshape(-1, 16, 16)  # (B, h, w)
    high = written / written.median() > 7.0
    assert [[tuple(p) for p in image.nonzero().tolist()] for image in high] == planted.artifact_positions(pixel_values)


def photo_like(num_images: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth colour noise of random contrast over a random ramp: unlike the scenes, every degree of local contrast
    occurs, so the register neurons also fire weakly, as on photos."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size, 3)), sigma=(*rng.uniform(1, 4, size=2), 0))
        ramp = np.linspace(0, rng.uniform(-80, 80), size)[None, :, None]
        image = rng.integers(0, 256, size=3) + rng.uniform(5, 120) * noise / noise.std() + ramp
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def test_ground_truth_is_near_full_strength_writes_on_photo_like_images(planted):
    pixel_values = planted.preprocess(photo_like(32, 32))
    activations = planted.register_activations(pixel_values).flatten(1)  # (B, N)
    truth = planted.artifact_mask(pixel_values).flatten(1)
    full = planted.firing_threshold / FULL_STRENGTH_FRACTION
    assert ((activations > 0.05 * full) & ~truth).any()  # weak writes happen and are not ground truth
    assert 0.005 <= truth.float().mean() <= 0.04  # about 1-2 % of the tokens
    last = patch_norms(planted.model, pixel_values)[-1]  # (B, N)
    ratio = last[truth] / last.median()
    # At least 10x the median norm (weak writes counted, the least was 7x); the most is 15x on the scenes the write
    # is sized on, up to 27x here where the median token is fainter (18-22x on real photos).
    assert ratio.min() >= 10.0 and ratio.max() <= 30.0


def test_artifacts_sit_on_plain_patches_at_gated_positions(planted, scene):
    pixel_values = planted.preprocess(scene.images)
    truth = planted.artifact_mask(pixel_values).flatten(1).numpy()  # (B, N)
    patches = pixel_values.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, 3, h, w, 2, 2)
    plain = (patches.flatten(-2).std(-1).amax(1) == 0).flatten(1).numpy()  # (B, N)
    assert plain[truth].all()
    rows, cols = np.nonzero(truth)
    assert set(cols.tolist()) <= set(planted.positions.tolist())
    positions = planted.artifact_positions(pixel_values)
    assert [len(p) for p in positions] == truth.sum(1).tolist()
    assert all(truth[i, r * 16 + c] for i, image in enumerate(positions) for r, c in image)


def test_oracle_is_the_model_without_the_write(planted, scene):
    pixel_values = planted.preprocess(scene.images)
    norms = patch_norms(planted.model, pixel_values)
    oracle_norms = patch_norms(planted.oracle, pixel_values)
    assert torch.equal(norms[: planted.layer - 1], oracle_norms[: planted.layer - 1])
    assert (oracle_norms / oracle_norms.median(-1, keepdim=True).values).max() < 4.0
    truth = planted.artifact_mask(pixel_values).flatten(1)
    # Away from the artifacts the two models agree up to what attention mixes in.
    relative = (norms[-1] - oracle_norms[-1]).abs() / oracle_norms[-1]
    assert relative[~truth].median() < 0.01


def test_register_neurons_are_where_the_model_says():
    planted = make_artifact_model("vit", num_neurons=3, layer=4, seed=1)
    assert [layer for layer, _ in planted.neurons] == [4, 4, 4]
    assert len({unit for _, unit in planted.neurons}) == 3
    fc2 = planted.oracle.layers[3].mlp.fc2
    assert torch.equal(fc2.weight[:, [unit for _, unit in planted.neurons]], torch.zeros(64, 3))
    units = [unit for _, unit in planted.neurons]
    written = planted.model.layers[3].mlp.fc2.weight[:, units]
    assert written.norm(dim=0).min() > 1.0


def test_same_seed_same_model_and_truth(scene):
    a, b = make_artifact_model("dinov2"), planted_model("dinov2")
    pixel_values = a.preprocess(scene.images)
    assert a.neurons == b.neurons
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.artifact_positions(pixel_values) == b.artifact_positions(pixel_values)


def test_oracle_features_are_flip_and_shift_equivariant(planted, scene):
    pixel_values = planted.preprocess(scene.images[:4])

    def features(model, x):
        return patch_features(find_vision_tower(model), x, "tokens").reshape(len(x), 16, 16, -1)  # (B, h, w, D)

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()

    shifted = torch.cat([pixel_values[..., :2], pixel_values[..., :-2]], dim=-1)  # one patch to the right
    for model, minimum in ((planted.oracle, 0.97), (planted.model, 0.95)):  # the numbers in the docs
        reference = features(model, pixel_values)
        assert cosine(features(model, pixel_values.flip(-1)), reference.flip(2)) > minimum
        assert cosine(features(model, shifted)[:, :, 1:], reference[:, :, :-1]) > minimum
    # The artifacts stay at their grid positions when the content moves: they are not equivariant.
    oracle, model = features(planted.oracle, shifted), features(planted.model, shifted)
    assert cosine(model[:, :, 1:], features(planted.model, pixel_values)[:, :, :-1]) < cosine(
        oracle[:, :, 1:], features(planted.oracle, pixel_values)[:, :, :-1]
    )


def test_object_images_have_one_textured_box_on_a_plain_background():
    scene = make_object_images(5, 40, seed=2)
    assert scene.images.shape == (5, 40, 40, 3) and scene.images.dtype == np.uint8
    for image, (x0, y0, x1, y1) in zip(scene.images, scene.boxes):
        assert 0.3 * 40 - 1 <= x1 - x0 <= 0.55 * 40 + 1 and 0.3 * 40 - 1 <= y1 - y0 <= 0.55 * 40 + 1
        outside = np.ones((40, 40), dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert len(np.unique(image[outside], axis=0)) == 1  # one background colour
        assert image[y0:y1, x0:x1].reshape(-1, 3).std(0).min() > 20  # texture inside
    assert np.array_equal(make_object_images(5, 40, seed=2).images, scene.images)


def test_unsupported_family_is_refused():
    with pytest.raises(
        UnsupportedModelError,
        match=r"^Cannot plant artifacts in family 'beit'\. Available: vit, deit, dinov2, dinov2-with-registers, "
        r"clip-vision, clip, siglip, ijepa\.$",
    ):
        make_artifact_model("beit")

"""Small, randomly initialised models of every supported family, built from configs.

They need no download, so the demo, the examples and the test suite run offline. Sizes are deliberately odd
(30 px images, 2 px patches: a 15 x 15 grid) so that shape bugs surface.

>>> from register_adapter.tiny import build_tiny_model
>>> model = build_tiny_model("tiny-dinov2")
>>> model.config.hidden_size
32
"""

from __future__ import annotations

from typing import Any

import transformers

from .errors import UnsupportedModelError

_COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
_VISION = {**_COMMON, "image_size": 30, "patch_size": 2}

# name -> (config class, config kwargs, {task: model class name})
TINY_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "tiny-vit": (
        "ViTConfig",
        _VISION,
        {
            "base": "ViTModel",
            "classification": "ViTForImageClassification",
            "masked-image-modeling": "ViTForMaskedImageModeling",
        },
    ),
    "tiny-deit": (
        "DeiTConfig",
        _VISION,
        {
            "base": "DeiTModel",
            "classification": "DeiTForImageClassification",
            "classification-with-teacher": "DeiTForImageClassificationWithTeacher",
        },
    ),
    "tiny-dinov2": (
        "Dinov2Config",
        _VISION,
        {"base": "Dinov2Model", "classification": "Dinov2ForImageClassification", "backbone": "Dinov2Backbone"},
    ),
    "tiny-dinov2-with-registers": (
        "Dinov2WithRegistersConfig",
        {**_VISION, "num_register_tokens": 2},
        {
            "base": "Dinov2WithRegistersModel",
            "classification": "Dinov2WithRegistersForImageClassification",
            "backbone": "Dinov2WithRegistersBackbone",
        },
    ),
    "tiny-dinov3": (
        "DINOv3ViTConfig",
        {**_VISION, "image_size": 32, "patch_size": 4, "num_register_tokens": 2},
        {"base": "DINOv3ViTModel", "backbone": "DINOv3ViTBackbone"},
    ),
    "tiny-clip-vision": (
        "CLIPVisionConfig",
        _VISION,
        {"base": "CLIPVisionModel", "projection": "CLIPVisionModelWithProjection"},
    ),
    "tiny-siglip": ("SiglipVisionConfig", _VISION, {"base": "SiglipVisionModel"}),
    "tiny-siglip2": (
        "Siglip2VisionConfig",
        {**_COMMON, "patch_size": 2, "num_patches": 225},
        {"base": "Siglip2VisionModel"},
    ),
    "tiny-ijepa": (
        "IJepaConfig",
        _VISION,
        {"base": "IJepaModel", "classification": "IJepaForImageClassification"},
    ),
    "tiny-vit-mae": (
        "ViTMAEConfig",
        {
            **_VISION,
            "decoder_hidden_size": 16,
            "decoder_num_hidden_layers": 1,
            "decoder_num_attention_heads": 2,
            "decoder_intermediate_size": 19,
        },
        {"base": "ViTMAEModel", "pretraining": "ViTMAEForPreTraining"},
    ),
    "tiny-aimv2": ("Aimv2VisionConfig", _VISION, {"base": "Aimv2VisionModel"}),
    "tiny-beit": ("BeitConfig", _VISION, {"base": "BeitModel", "classification": "BeitForImageClassification"}),
    "tiny-data2vec-vision": (
        "Data2VecVisionConfig",
        _VISION,
        {"base": "Data2VecVisionModel", "classification": "Data2VecVisionForImageClassification"},
    ),
    # A full CLIP (text + vision): registers go into the vision tower only.
    "tiny-clip": (
        "CLIPConfig",
        {
            "text_config": {
                **_COMMON,
                "vocab_size": 99,
                "max_position_embeddings": 16,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
            },
            "vision_config": _VISION,
            "projection_dim": 16,
        },
        {"base": "CLIPModel", "classification": "CLIPForImageClassification"},
    ),
}


def supported_tiny_models() -> list[str]:
    """The tiny models of the families that take registers, sorted (``tiny-beit`` and ``tiny-data2vec-vision`` are
    there to test that their families are refused)."""
    from .architectures import UNSUPPORTED

    return sorted(
        name
        for name, (config, _, _) in TINY_MODELS.items()
        if getattr(transformers, config).model_type not in UNSUPPORTED
    )


def tiny_config(name: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The config of the built-in tiny model ``name`` with ``overrides`` applied (e.g. ``num_labels=3``)."""
    if name not in TINY_MODELS:
        raise UnsupportedModelError(f"Unknown tiny model {name!r}. Available: {', '.join(sorted(TINY_MODELS))}.")
    config_cls, kwargs, _ = TINY_MODELS[name]
    return getattr(transformers, config_cls)(**{**kwargs, **overrides})


def build_tiny_model(
    name: str, task: str = "base", *, seed: int = 0, **overrides: Any
) -> transformers.PreTrainedModel:
    """Build the tiny model ``name`` for ``task`` (``"base"``, ``"classification"``, ``"backbone"``, ...).

    Weights are random but reproducible: the same ``seed`` gives the same model.
    """
    import torch

    config = tiny_config(name, **overrides)
    tasks = TINY_MODELS[name][2]
    if task not in tasks:
        raise UnsupportedModelError(
            f"The tiny model {name!r} has no {task!r} variant. Available: {', '.join(sorted(tasks))}."
        )
    torch.manual_seed(seed)
    return getattr(transformers, tasks[task])(config).eval()


def tiny_image_size(name: str) -> int:
    """Side length in pixels of the square images that the tiny model ``name`` expects."""
    config = tiny_config(name)
    config = getattr(config, "vision_config", config)
    return int(getattr(config, "image_size", 30))

"""One table of per-family facts: where the embeddings, position embeddings, patch embedding, blocks, attention and
MLP projections live, how many tokens come before the registers, and where registers have to be removed again.

Adding a family is one row: build a :class:`FamilySpec` and pass it to :func:`register_family`.

>>> from register_adapter.architectures import FamilySpec, register_family
>>> register_family(FamilySpec(name="my_vit", model_types=("my_vit",), layers="layers", strip_at="layernorm",
...                            mlp_out_proj=("mlp.fc2",)))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UnsupportedModelError


def _cls_only(config: Any) -> int:
    return 1


def _no_prefix(config: Any) -> int:
    return 0


def _cls_and_distillation(config: Any) -> int:
    return 2


def _cls_and_native_registers(config: Any) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0))


@dataclass(frozen=True)
class FamilySpec:
    """Facts about one vision-transformer family, relative to its *vision tower* (the module owning ``embeddings``).

    Args:
        name: Family name used in configs and model cards.
        model_types: ``config.model_type`` values of the vision tower that belong to this family.
        layers: Dotted path of the ``nn.ModuleList`` of transformer blocks.
        strip_at: Dotted path of the module whose output is ``last_hidden_state`` (tensor, or a model output with a
            ``last_hidden_state``); registers are removed from it. Everything after it (poolers, heads) sees the
            sequence without registers.
        encoder: Dotted path of the module returning the per-layer ``hidden_states``. ``*Backbone`` models build
            feature maps from them, so for backbones registers are removed there instead.
        mlp_out_proj: Candidate dotted paths, inside one block, of the MLP output projection. Its input is the MLP
            hidden activation (post-GELU, or the gated product for SwiGLU), where register neurons live.
        num_prefix_tokens: ``config -> int``, the tokens before the inserted registers (CLS, distillation token,
            native registers).
        has_cls: Whether token 0 is a CLS token.
        mask_argument: Name of the tower's forward argument holding a per-token attention mask (padded for the
            registers), or ``None`` when its forward takes none. ViTMAE's mask covers the tokens kept by its random
            masking (CLS + kept patches).
        unpad_mask_at: Modules after ``strip_at`` that receive the same mask and must get it without registers.
        embeddings: Attribute name of the embeddings module.
        native_register_attribute: Attribute of the embeddings holding registers the architecture has itself.
        image_input: Whether the tower takes images as (B, 3, H, W) ``pixel_values`` on a fixed patch grid (SigLIP2
            takes pre-patchified sequences with per-image spatial shapes instead); the diagnostics need it.
        spatial_heads: Class names of the models around the tower whose head lays the tower's output out on the patch
            grid (masked-image-modeling decoders, the MAE decoder). Registers are removed before them even with
            ``strip_registers=False``: they are not patches.
        attention: Dotted paths, inside one block, of the query, key and value projections.
        patch_embedding: Dotted path, inside the embeddings, of the patch embedding (a ``Conv2d``; SigLIP2's is a
            ``Linear`` on pre-patchified pixels).
        position_embeddings: Dotted path, inside the embeddings, of the learned position table: an ``nn.Parameter``
            or an ``nn.Embedding``; ``None`` for families that rotate queries and keys instead (DINOv3's RoPE).
        final_norm: Dotted path of the norm after the last block, when it is not ``strip_at``: CLIP applies its
            ``post_layernorm`` to the pooled CLS token only, dense CLIP features apply it to every token.
        random_patch_order: Whether the embeddings drop and shuffle patches at random (ViTMAE's masking), so that
            patch tokens do not come out in the order of the patch grid.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    strip_at: str
    mlp_out_proj: tuple[str, ...]
    encoder: str | None = None
    num_prefix_tokens: Callable[[Any], int] = _cls_only
    has_cls: bool = True
    mask_argument: str | None = "attention_mask"
    unpad_mask_at: tuple[str, ...] = ()
    embeddings: str = "embeddings"
    native_register_attribute: str | None = None
    image_input: bool = True
    spatial_heads: tuple[str, ...] = ()
    attention: tuple[str, str, str] = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    patch_embedding: str = "patch_embeddings.projection"
    position_embeddings: str | None = "position_embeddings"
    final_norm: str | None = None
    random_patch_order: bool = False


_VIT_LIKE = {"layers": "layers", "strip_at": "layernorm", "mlp_out_proj": ("mlp.fc2",)}
_CLIP_LIKE = {
    "layers": "encoder.layers",
    "mlp_out_proj": ("mlp.fc2",),
    "mask_argument": None,
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "patch_embedding": "patch_embedding",
    "position_embeddings": "position_embedding",
}
# DINOv2's MLP is fc1 -> GELU -> fc2, or with use_swiglu_ffn (ViT-g) gate_proj/up_proj -> SiLU gate -> down_proj.
_DINO = {
    "layers": "encoder.layer",
    "strip_at": "layernorm",
    "encoder": "encoder",
    "mlp_out_proj": ("mlp.fc2", "mlp.down_proj"),
}

FAMILIES: dict[str, FamilySpec] = {}
UNSUPPORTED: dict[str, str] = {
    "beit": (
        "BEiT adds a relative position bias sized to exactly 1 + num_patches tokens in every attention layer, so "
        "extra tokens cannot be inserted without retraining that bias"
    ),
    "data2vec-vision": (
        "Data2VecVision adds a relative position bias sized to exactly 1 + num_patches tokens in every attention "
        "layer, so extra tokens cannot be inserted without retraining that bias"
    ),
}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Declare a family; the extension point for models that are not built in. Returns ``spec``."""
    for model_type in spec.model_types:
        FAMILIES[model_type] = spec
    return spec


for _spec in (
    FamilySpec(name="vit", model_types=("vit",), spatial_heads=("ViTForMaskedImageModeling",), **_VIT_LIKE),
    FamilySpec(
        name="deit",
        model_types=("deit",),
        num_prefix_tokens=_cls_and_distillation,
        spatial_heads=("DeiTForMaskedImageModeling",),
        **_VIT_LIKE,
    ),
    FamilySpec(name="ijepa", model_types=("ijepa",), num_prefix_tokens=_no_prefix, has_cls=False, **_VIT_LIKE),
    FamilySpec(
        name="vit_mae",
        model_types=("vit_mae",),
        spatial_heads=("ViTMAEForPreTraining",),
        random_patch_order=True,
        **_VIT_LIKE,
    ),
    FamilySpec(name="dinov2", model_types=("dinov2",), **_DINO),
    FamilySpec(
        name="dinov2_with_registers",
        model_types=("dinov2_with_registers",),
        num_prefix_tokens=_cls_and_native_registers,
        native_register_attribute="register_tokens",
        **_DINO,
    ),
    FamilySpec(
        name="dinov3_vit",
        model_types=("dinov3_vit",),
        layers="model.layer",
        strip_at="norm",
        encoder="model",
        mlp_out_proj=("mlp.down_proj", "mlp.fc2"),
        num_prefix_tokens=_cls_and_native_registers,
        mask_argument=None,
        native_register_attribute="register_tokens",
        patch_embedding="patch_embeddings",
        position_embeddings=None,
    ),
    FamilySpec(
        name="clip", model_types=("clip_vision_model",), strip_at="encoder", final_norm="post_layernorm", **_CLIP_LIKE
    ),
    FamilySpec(
        name="siglip",
        model_types=("siglip_vision_model",),
        strip_at="post_layernorm",
        num_prefix_tokens=_no_prefix,
        has_cls=False,
        **_CLIP_LIKE,
    ),
    FamilySpec(
        name="siglip2",
        model_types=("siglip2_vision_model",),
        strip_at="post_layernorm",
        num_prefix_tokens=_no_prefix,
        has_cls=False,
        unpad_mask_at=("head",),
        image_input=False,
        **{**_CLIP_LIKE, "mask_argument": "pixel_attention_mask"},
    ),
    FamilySpec(
        name="aimv2",
        model_types=("aimv2_vision_model",),
        layers="encoder.layers",
        strip_at="rms_norm",
        mlp_out_proj=("ffn.down_proj",),
        num_prefix_tokens=_no_prefix,
        has_cls=False,
        mask_argument=None,
        patch_embedding="patch_embed",
        position_embeddings="position_embedding",
    ),
):
    register_family(_spec)


@dataclass
class VisionTower:
    """The part of a model that a register adapter acts on.

    Attributes:
        module: The module owning ``embeddings`` (e.g. ``ViTModel``, ``CLIPModel.vision_model``).
        path: Its dotted path inside the model given to :func:`find_vision_tower` (``""`` for the model itself).
        spec: The family's :class:`FamilySpec`.
        root: The model given to :func:`find_vision_tower` (``PeftModel`` wrappers removed).
    """

    module: nn.Module
    path: str
    spec: FamilySpec
    root: nn.Module | None = field(default=None, repr=False)

    @property
    def parent(self) -> nn.Module | None:
        """The module holding the tower (e.g. ``ViTForMaskedImageModeling`` around its ``vit``); ``None`` for the
        model itself."""
        if not self.path or self.root is None:
            return None
        parent_path = self.path.rpartition(".")[0]
        return self.root.get_submodule(parent_path) if parent_path else self.root

    @property
    def has_spatial_head(self) -> bool:
        """Whether the model around the tower lays its output out on the patch grid (see ``FamilySpec.spatial_heads``)."""
        parent = self.parent
        return parent is not None and any(cls.__name__ in self.spec.spatial_heads for cls in type(parent).__mro__)

    @property
    def config(self) -> Any:
        """The vision config (``CLIPVisionConfig`` for CLIP, the model config otherwise)."""
        return self.module.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the inserted registers: CLS, distillation token and native registers."""
        return self.spec.num_prefix_tokens(self.config)

    @property
    def num_native_registers(self) -> int:
        if self.spec.native_register_attribute is None:
            return 0
        return int(getattr(self.config, "num_register_tokens", 0))

    @property
    def patch_size(self) -> int:
        patch_size = self.config.patch_size
        return int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size)

    @property
    def embeddings(self) -> nn.Module:
        return getattr(self.module, self.spec.embeddings)

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, input to output."""
        return list(self.module.get_submodule(self.spec.layers))

    def submodule(self, path: str) -> nn.Module:
        return self.module.get_submodule(path)

    def key(self, path: str) -> str:
        """The dotted name, in the model given to :func:`find_vision_tower`, of ``path`` inside the tower."""
        return f"{self.path}.{path}" if self.path else path

    ATTENTION_KINDS = ("queries", "keys", "values")

    def attention_projection(self, block: nn.Module, kind: str) -> nn.Module:
        """The ``"queries"``, ``"keys"`` or ``"values"`` projection of ``block`` (a LoRA layer around it, if any)."""
        return block.get_submodule(self.spec.attention[self.ATTENTION_KINDS.index(kind)])

    @property
    def patch_embedding(self) -> nn.Module:
        """The patch embedding (see ``FamilySpec.patch_embedding``)."""
        return self.embeddings.get_submodule(self.spec.patch_embedding)

    @property
    def position_embeddings(self) -> nn.Parameter | None:
        """The learned position table as a parameter (an ``nn.Embedding``'s weight), ``None`` without one."""
        if self.spec.position_embeddings is None:
            return None
        owner, _, name = self.spec.position_embeddings.rpartition(".")
        table = getattr(self.embeddings.get_submodule(owner) if owner else self.embeddings, name)
        return table.weight if isinstance(table, nn.Embedding) else table

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied after the last block (see ``FamilySpec.final_norm``): its output is the tower's final
        normed tokens."""
        return self.submodule(self.spec.final_norm or self.spec.strip_at)

    def mlp_out_proj(self, block: nn.Module) -> nn.Module:
        """The MLP output projection of ``block``; its input is the MLP hidden activation."""
        return block.get_submodule(self.mlp_out_proj_path(block))

    def mlp_out_proj_path(self, block: nn.Module) -> str:
        """Dotted path, inside ``block``, of its MLP output projection (the first of ``FamilySpec.mlp_out_proj`` that
        ``block`` has)."""
        for path in self.spec.mlp_out_proj:
            try:
                block.get_submodule(path)
            except AttributeError:
                continue
            return path
        raise UnsupportedModelError(
            f"No MLP output projection found in {type(block).__name__} at any of {list(self.spec.mlp_out_proj)}."
        )


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def _unwrap(model: nn.Module) -> nn.Module:
    # PeftModel -> tuner -> user model; the tuner's `model` attribute is the adapted model.
    base = getattr(model, "base_model", None)
    if base is not None and base is not model and hasattr(base, "peft_config") and hasattr(base, "model"):
        return base.model
    return model


def find_vision_tower(model: nn.Module) -> VisionTower:
    """Locate the vision tower of any supported model (a ``PeftModel`` included).

    Raises:
        UnsupportedModelError: the model holds no vision tower of a supported family; the message lists the
            supported model types and how to declare a new family.
    """
    root = _unwrap(model)
    seen_types = []
    for path, module in root.named_modules():
        embeddings = getattr(module, "embeddings", None)
        config = getattr(module, "config", None)
        if not isinstance(embeddings, nn.Module) or config is None:
            continue
        model_type = getattr(config, "model_type", None)
        if model_type in FAMILIES:
            return VisionTower(module=module, path=path, spec=FAMILIES[model_type], root=root)
        if model_type in UNSUPPORTED:
            raise UnsupportedModelError(f"{type(module).__name__} is not supported: {UNSUPPORTED[model_type]}.")
        seen_types.append(model_type)
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    found = model_type or (seen_types[0] if seen_types else None)
    raise UnsupportedModelError(
        f"{type(root).__name__} (model_type={found!r}) has no vision tower that register_adapter supports. "
        f"Supported model types: {', '.join(supported_model_types())}. To add a family, declare it with "
        "register_adapter.register_family(FamilySpec(...)) (see register_adapter/architectures.py)."
    )

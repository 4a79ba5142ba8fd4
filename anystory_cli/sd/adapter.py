"""The AnyStory adapter: every trainable module, its configuration, and installation on a UNet.

An adapter is made for one base UNet architecture. Its config records that UNet's config (to
rebuild the ReferenceNet) and the shape of every attention layer it injects into, so a weights
file alone rebuilds the modules and a mismatched base model is refused with a clear message.

`AnyStoryAdapter` is a diffusers `ModelMixin`/`ConfigMixin`: `save_pretrained(folder)` writes
`config.json` + weights and `AnyStoryAdapter.from_pretrained(folder)` reads them back, like any
diffusers model; `adapter.config` is that registered config (plain JSON values) and
`adapter.spec` the same values as the typed `AnyStoryConfig` the modules are built from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from ..errors import ModelError
from .attention import CrossAttentionProcessor, SelfAttentionProcessor
from .qformer import QFormer, QFormerConfig
from .reference_net import ReferenceNet, forward_order
from .router import LayerRouter

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LayerSpec:
    name: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    query_dim: int  # width of the latent tokens
    inner_dim: int  # heads * head_dim of the attention
    context_dim: int  # width of what keys/values are projected from


@dataclass(frozen=True)
class AnyStoryConfig:
    unet_config: dict
    cross_layers: tuple[LayerSpec, ...]  # forward order
    self_layers: tuple[LayerSpec, ...]  # forward order
    image_embed_dim: int  # width of the image encoder's penultimate hidden states
    image_size: int = 224  # image encoder input size
    num_subject_tokens: int = 64  # m (paper)
    qformer_hidden_dim: int = 768
    qformer_depth: int = 4  # paper: 4 layers for both QFormers
    qformer_heads: int = 8
    routing_dim: int = 768  # width of the routing features R_i
    router_hidden_dim: int = 64
    # 3x3 convolutions of each router's latent tokens before its keys (router.py); 0 = the paper's
    # per-token projection. Adapters saved before this field existed load with 0.
    router_context_layers: int = 0
    router_context_dim: int = 128
    max_characters: int = 4
    reference_size: int = 512  # paper: 512x512 references
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def reference_layers(self) -> tuple[LayerSpec, ...]:
        """Self-attention layers fed by the ReferenceNet: all but the first (paper)."""
        return self.self_layers[1:]

    @property
    def cross_attention_dim(self) -> int:
        return self.cross_layers[0].context_dim

    def subject_qformer(self) -> QFormerConfig:
        return QFormerConfig(
            self.image_embed_dim, self.cross_attention_dim, self.num_subject_tokens,
            self.qformer_hidden_dim, self.qformer_depth, self.qformer_heads,
        )

    def routing_qformer(self) -> QFormerConfig:
        return QFormerConfig(
            self.image_embed_dim, self.routing_dim, 1,
            self.qformer_hidden_dim, self.qformer_depth, self.qformer_heads,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_dict(self) -> dict:
        """Plain JSON values (what `AnyStoryAdapter.config` registers)."""
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> "AnyStoryConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> "AnyStoryConfig":
        """From plain values (a JSON config); keys that are not fields are ignored."""
        data = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        data["unet_config"] = dict(data["unet_config"])
        data["cross_layers"] = tuple(_layer_spec(x) for x in data["cross_layers"])
        data["self_layers"] = tuple(_layer_spec(x) for x in data["self_layers"])
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def for_unet(cls, unet: nn.Module, image_embed_dim: int, **options) -> "AnyStoryConfig":
        """The config of an adapter for `unet`; `options` override the defaults above."""
        cross, own = _layer_specs(unet)
        if not cross:
            raise ModelError("the UNet has no cross-attention layers to inject characters into")
        unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        return cls(unet_config=json.loads(json.dumps(unet_config)), cross_layers=cross,
                   self_layers=own, image_embed_dim=image_embed_dim, **options)


def _layer_spec(value) -> LayerSpec:
    return value if isinstance(value, LayerSpec) else LayerSpec(**value)


def _layer_specs(unet: nn.Module) -> tuple[tuple[LayerSpec, ...], tuple[LayerSpec, ...]]:
    """Cross- and self-attention layers of the transformer blocks, in forward order."""
    modules = dict(unet.named_modules())

    def specs(suffix):
        names = forward_order([n for n in modules if n.endswith(suffix)])
        return tuple(LayerSpec(n, modules[n].to_q.in_features, modules[n].to_k.out_features,
                               modules[n].to_k.in_features) for n in names)

    return specs(".attn2"), specs(".attn1")


def module_key(layer_name: str) -> str:
    """nn.ModuleDict keys cannot contain dots."""
    return layer_name.replace(".", "__")


def _kv_pair(spec: LayerSpec) -> nn.ModuleDict:
    return nn.ModuleDict({
        "to_k": nn.Linear(spec.context_dim, spec.inner_dim, bias=False),
        "to_v": nn.Linear(spec.context_dim, spec.inner_dim, bias=False),
    })


class AnyStoryAdapter(ModelMixin, ConfigMixin):
    """Subject QFormer, routing QFormer, ReferenceNet, per-layer routers and the new K/V weights
    (Ŵ for cross-attention, W̃ for self-attention). The constructor takes the fields of
    `AnyStoryConfig` as plain values; `from_spec` builds one from the dataclass."""

    config_name = "config.json"
    ignore_for_config = ["reference_net"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, unet_config: dict, cross_layers: list, self_layers: list, image_embed_dim: int,
                 image_size: int = 224, num_subject_tokens: int = 64, qformer_hidden_dim: int = 768,
                 qformer_depth: int = 4, qformer_heads: int = 8, routing_dim: int = 768,
                 router_hidden_dim: int = 64, router_context_layers: int = 0, router_context_dim: int = 128,
                 max_characters: int = 4, reference_size: int = 512, image_mean: tuple = CLIP_MEAN,
                 image_std: tuple = CLIP_STD, reference_net: ReferenceNet | None = None):
        super().__init__()
        values = {k: v for k, v in locals().items() if k in _CONFIG_FIELDS}
        self.spec = config = AnyStoryConfig.from_dict(values)
        self.subject_qformer = QFormer(config.subject_qformer())
        self.routing_qformer = QFormer(config.routing_qformer())
        self.reference_net = reference_net if reference_net is not None else ReferenceNet(config.unet_config)
        self.routers = nn.ModuleDict({
            module_key(s.name): LayerRouter(config.routing_dim, s.query_dim, config.router_hidden_dim,
                                            config.router_context_layers, config.router_context_dim)
            for s in config.cross_layers
        })
        self.subject_kv = nn.ModuleDict({module_key(s.name): _kv_pair(s) for s in config.cross_layers})
        # Reference features are the ReferenceNet's attn1 inputs: width query_dim.
        self.reference_kv = nn.ModuleDict({
            module_key(s.name): _kv_pair(replace(s, context_dim=s.query_dim)) for s in config.reference_layers
        })

    @classmethod
    def from_spec(cls, spec: AnyStoryConfig, reference_net: ReferenceNet | None = None) -> "AnyStoryAdapter":
        """An adapter built from the typed config (its weights random, or the given ReferenceNet)."""
        return cls(**spec.to_dict(), reference_net=reference_net)

    @classmethod
    def from_unet(cls, unet: nn.Module, image_embed_dim: int, **options) -> "AnyStoryAdapter":
        """A fresh adapter: ReferenceNet copied from `unet`; Ŵ and W̃ initialised from the layer's
        text and self-attention K/V (paper), QFormers and routers random."""
        adapter = cls.from_spec(AnyStoryConfig.for_unet(unet, image_embed_dim, **options), ReferenceNet.from_unet(unet))
        modules = dict(unet.named_modules())
        with torch.no_grad():
            for spec in adapter.spec.cross_layers:
                _copy_kv(adapter.subject_kv[module_key(spec.name)], modules[spec.name])
            for spec in adapter.spec.reference_layers:
                _copy_kv(adapter.reference_kv[module_key(spec.name)], modules[spec.name])
        return adapter.to(dtype=unet.dtype)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "AnyStoryAdapter":
        """diffusers' `from_pretrained`, which hands the modules the loaded tensors themselves;
        copies in fresh memory compute bit for bit what the saved adapter computes (as for the
        single file, `weights.load_adapter`), so a saved pipeline draws what it drew."""
        adapter = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in [*adapter.parameters(), *adapter.buffers()]:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
        return adapter

    def to(self, *args, **kwargs):
        # ModelMixin.to warns about modules to keep in float32 on every dtype cast, even with none
        # listed; the adapter keeps none, so it moves and casts as a plain torch module does.
        return nn.Module.to(self, *args, **kwargs)

    # The adapter is called through these methods, never through `forward`: each is decorated,
    # as AutoencoderKL.encode is, so that a pipeline's CPU offload hook moves the adapter to the
    # execution device before its weights are used.

    @apply_forward_hook
    def encode_features(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, image_embed_dim) -> subject tokens (B, m, d_c), routing features (B, d_r)."""
        return self.subject_qformer(image_features), self.routing_qformer(image_features)[:, 0]

    @apply_forward_hook
    def reference_features(self, latents: torch.Tensor, mask: torch.Tensor,
                           image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The ReferenceNet at t = 0 on a reference's latents and mask: attn1 name -> features."""
        return self.reference_net(latents, mask, image_size)

    @apply_forward_hook
    def attention_processors(self, unet: nn.Module) -> dict:
        """AnyStory processors for every transformer attention layer of `unet` (the others keep
        theirs), pointing at this adapter's routers and K/V weights."""
        check_fits(self.spec, unet)
        processors = {}
        for key, original in unet.attn_processors.items():
            layer = key.removesuffix(".processor")
            mk = module_key(layer)
            if mk in self.routers:
                kv = self.subject_kv[mk]
                processors[key] = CrossAttentionProcessor(layer, self.routers[mk], kv["to_k"], kv["to_v"], original)
            elif layer.endswith(".attn1"):
                # The first self-attention layer gets no references, but still takes the context.
                kv = self.reference_kv[mk] if mk in self.reference_kv else {"to_k": None, "to_v": None}
                processors[key] = SelfAttentionProcessor(layer, kv["to_k"], kv["to_v"], original)
            else:
                processors[key] = original
        return processors

    def fingerprint(self) -> str:
        """A short id of these weights: encodings made with other weights are refused."""
        digest = hashlib.sha256(self.spec.to_json().encode())
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                t = tensor.detach().float().flatten()
                digest.update(name.encode())
                digest.update(repr((tuple(tensor.shape), float(t.sum()), float(t.abs().sum()))).encode())
                digest.update(t[:16].cpu().numpy().tobytes())  # the adapter may live on a GPU
        return digest.hexdigest()[:16]


_CONFIG_FIELDS = {f.name for f in fields(AnyStoryConfig)}


def _copy_kv(target: nn.ModuleDict, attn: nn.Module) -> None:
    target["to_k"].weight.copy_(attn.to_k.weight)
    target["to_v"].weight.copy_(attn.to_v.weight)


@dataclass
class InstalledAdapter:
    """Processors installed on a UNet; `remove()` restores the original processors."""

    unet: nn.Module
    originals: dict
    hook: object = field(repr=False)

    def remove(self) -> None:
        self.unet.set_attn_processor(dict(self.originals))  # set_attn_processor empties its argument
        self.hook.remove()


def _begin_forward_hook(module, args, kwargs):
    context = (kwargs.get("cross_attention_kwargs") or {}).get("anystory")
    if context is not None:
        sample = args[0] if args else kwargs["sample"]
        context.begin_forward(sample.shape[0])


def check_fits(config: AnyStoryConfig, unet: nn.Module) -> None:
    """Refuse a base UNet whose attention layers differ from the ones the adapter was made for."""
    cross, own = _layer_specs(unet)
    if (cross, own) == (config.cross_layers, config.self_layers):
        return
    expected = {s.name: s for s in config.cross_layers + config.self_layers}
    found = {s.name: s for s in cross + own}
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            raise ModelError(
                f"adapter does not fit this base model at {name}: adapter expects "
                f"{expected.get(name)}, the UNet has {found.get(name)}"
            )


def install(adapter: AnyStoryAdapter, unet: nn.Module) -> InstalledAdapter:
    """Put AnyStory processors on every transformer attention layer of `unet`, and the hook that
    starts each UNet forward of a context; `remove()` takes both away."""
    originals = dict(unet.attn_processors)
    unet.set_attn_processor(adapter.attention_processors(unet))
    hook = unet.register_forward_pre_hook(_begin_forward_hook, with_kwargs=True)
    return InstalledAdapter(unet, originals, hook)

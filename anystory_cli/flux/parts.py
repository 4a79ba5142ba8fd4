"""The parts the released checkpoint and FLUX.1-Redux add to a FluxPipeline, built and checked,
and where a saved AnyStory pipeline is (a folder, or a hub id)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import FluxTransformer2DModel
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from ..errors import ModelError
from .adapter import AnyStoryFluxAdapter
from .embedders import SubjectEmbedder
from .processors import REFERENCE_ADAPTER, ROUTER_ADAPTER
from .weights import load_module_part, read_checkpoint, split_router

SUBJECT_GRID, ROUTER_GRID = 9, 3  # tokens per character: 81 subject, 9 router


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_embedder(what: str, embedder, width: int, image_encoder) -> None:
    """ModelError when a Redux-shaped embedder does not join this FLUX text stream (`width`) to
    this SigLIP encoder."""
    if embedder.config.txt_in_features != width:
        raise ModelError(f"the {what} embedder gives {embedder.config.txt_in_features}-wide tokens, this FLUX "
                         f"text stream is {width} wide (a Redux folder for another model?)")
    if embedder.config.redux_dim != image_encoder.config.hidden_size:
        raise ModelError(f"the {what} embedder takes {embedder.config.redux_dim}-wide SigLIP features, "
                         f"its image encoder gives {image_encoder.config.hidden_size}")


def check_parts(transformer, image_encoder, subject_embedder, router_embedder, adapter) -> None:
    """ModelError when the AnyStory parts were made for another FLUX or Redux model."""
    config = transformer.config
    for what, embedder in (("subject", subject_embedder), ("router", router_embedder)):
        check_embedder(what, embedder, config.joint_attention_dim, image_encoder)
    hidden = config.num_attention_heads * config.attention_head_dim
    shape = (adapter.config.hidden_size, adapter.config.num_layers, adapter.config.num_single_layers)
    if shape != (hidden, config.num_layers, config.num_single_layers):
        raise ModelError(f"the AnyStory adapter is for a FLUX transformer of width {shape[0]} with {shape[1]} + "
                         f"{shape[2]} blocks; this one has width {hidden} and {config.num_layers} + "
                         f"{config.num_single_layers} blocks")


def transformer_config(base_dir: Path) -> SimpleNamespace:
    """The FLUX transformer's configuration (with the defaults its config.json leaves out), unloaded."""
    init, _, _ = FluxTransformer2DModel.extract_init_dict(
        FluxTransformer2DModel.load_config(str(base_dir / "transformer")))
    return SimpleNamespace(**init)


def saved_pipeline_folder(base, class_name: str) -> Path | None:
    """`base` when it is a local folder that save_pretrained of this class wrote."""
    index = Path(os.fspath(base)).expanduser() / "model_index.json"
    try:
        if json.loads(index.read_text()).get("_class_name") == class_name:
            return index.parent
    except (OSError, ValueError, AttributeError):
        pass
    return None


def saved_pipeline_on_hub(base, class_name: str) -> Path | None:
    """The snapshot of hub id `base` when it is a pipeline that save_pretrained of this class
    wrote (from the Hugging Face cache, downloaded once when online)."""
    from ..hub import model_part_dir, names_hub_part

    name = os.fspath(base)
    if Path(name).expanduser().exists() or not names_hub_part(name) or name.count("/") != 1:
        return None
    try:  # model_index.json alone first: a FLUX.1 id must not download the whole model here
        index = model_part_dir(f"{name}/model_index.json")
    except ModelError:
        return None
    if saved_pipeline_folder(index.parent, class_name) is None:
        return None
    return model_part_dir(name, pipeline=True)


def anystory_parts(redux_dir: Path, adapter_file: Path, config, dtype) -> dict:
    """The components the released checkpoint and FLUX.1-Redux add to a FluxPipeline: SigLIP and
    its processor, the two embedders, and the adapter (routing maps, with the LoRAs pending)."""
    from diffusers.pipelines import ReduxImageEncoder

    checkpoint = read_checkpoint(adapter_file)
    try:
        encoder = SiglipVisionModel.from_pretrained(str(redux_dir / "image_encoder"), dtype=dtype)
        redux = ReduxImageEncoder.from_pretrained(str(redux_dir / "image_embedder"), dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{redux_dir}: could not load ({first_line(exc)})") from None
    width = config.joint_attention_dim
    check_embedder("Redux", redux, width, encoder)
    router_lora, routing_maps, router_embedder = split_router(checkpoint["router"])

    def embedder(part: str, state: dict, grid: int) -> SubjectEmbedder:
        """Redux's projections plus the checkpoint's corrections, gate and pooling."""
        key = "redux_up_lora_A.weight"
        if key not in state:
            raise ModelError(f"{adapter_file}: part '{part}' has no {key}")
        module = SubjectEmbedder(redux.config.redux_dim, width, lora_rank=state[key].shape[0],
                                 lora_bias="redux_up_lora_B.bias" in state, grid=grid)
        module.load_state_dict(redux.state_dict(), strict=False)
        load_module_part(module, state, adapter_file, part, optional=("redux_up.", "redux_down."))
        # nn.Module.to: ModelMixin.to warns about float32-kept modules on every dtype cast.
        return torch.nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)

    size = encoder.config.image_size
    return {
        "redux_image_encoder": encoder.eval().requires_grad_(False),
        "redux_feature_extractor": SiglipImageProcessorPil(size={"height": size, "width": size}),
        "subject_embedder": embedder("redux", checkpoint["redux"], SUBJECT_GRID),
        "router_embedder": embedder("router", router_embedder, ROUTER_GRID),
        "anystory_adapter": _adapter(adapter_file, checkpoint["ref"], router_lora, routing_maps, config, dtype),
    }


def _adapter(path: Path, reference_lora: dict, router_lora: dict, routing_maps: dict, config,
             dtype) -> AnyStoryFluxAdapter:
    """The routing-map adapters of every block, and the checkpoint's two LoRA parts, pending."""
    first = routing_maps.get("transformer_blocks.0", {})
    if "to_q_routing_map_lora_A.weight" not in first:
        raise ModelError(f"{path}: part 'router' has no routing-map adapter for transformer_blocks.0")
    adapter = AnyStoryFluxAdapter(
        hidden_size=config.num_attention_heads * config.attention_head_dim, num_layers=config.num_layers,
        num_single_layers=config.num_single_layers, rank=first["to_q_routing_map_lora_A.weight"].shape[0],
        bias="to_q_routing_map_lora_B.bias" in first)
    blocks = [f"transformer_blocks.{i}" for i in range(config.num_layers)] + \
        [f"single_transformer_blocks.{i}" for i in range(config.num_single_layers)]
    for block in blocks:
        state = routing_maps.get(block)
        if not state or "to_q_routing_map_lora_A.weight" not in state:
            raise ModelError(f"{path}: part 'router' has no routing-map adapter for {block}")
        kind = "double" if block.startswith("transformer_blocks.") else "single"
        load_module_part(adapter.block(f"{kind}.{block.rsplit('.', 1)[1]}"), state, path, "router")
    extra = sorted(set(routing_maps) - set(blocks))
    if extra:
        raise ModelError(f"{path}: part 'router' has routing-map adapters for blocks this FLUX transformer lacks "
                         f"({extra[0]}; an adapter for a deeper model?)")
    adapter.pending_loras = {REFERENCE_ADAPTER: (reference_lora, None, path), ROUTER_ADAPTER: (router_lora, None, path)}
    return torch.nn.Module.to(adapter, dtype=dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def plain_state_dict(transformer):
    """While inside, `transformer.state_dict()` is its plain FLUX weights: without the peft LoRA
    layers' adapters, under the names of the unwrapped layers (how save_pretrained writes it)."""

    def plain(*args, **kwargs):
        full = type(transformer).state_dict(transformer, *args, **kwargs)
        return {k.replace(".base_layer.", "."): v for k, v in full.items() if ".lora_" not in k}

    transformer.state_dict = plain
    try:
        yield
    finally:
        del transformer.state_dict

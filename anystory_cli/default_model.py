"""The default model's base components, built from small dataclass configs.

Real diffusers / transformers classes only, so that everything downstream (StableDiffusionPipeline,
the AnyStory adapter, the image-feature path) runs the same code on these tiny models as on SD 1.5
or SDXL:

    build_vae(VaeConfig())                 -> diffusers.AutoencoderKL
    build_tokenizer(words)                 -> transformers.CLIPTokenizer, one token per world word
    unknown_words(prompt)                  -> words of a prompt the tokenizer does not know
    build_text_encoder(TextConfig(), tok)  -> transformers.CLIPTextModel
    build_image_encoder(VisionConfig())    -> transformers.CLIPVisionModel
    build_unet(UNetConfig(), vae, text)    -> diffusers.UNet2DConditionModel
    build_scheduler()                      -> diffusers.DDIMScheduler (v-prediction)
    assemble_pipeline(...)                 -> diffusers.StableDiffusionPipeline (safety_checker=None)
    load_default_base()                    -> (pipeline, image encoder) from the shipped assets
    load_panel_lora(unet)                  -> the UNet's own weights for wide and tall panels

The shipped assets live in `anystory_cli/assets/default/`: one fp16 safetensors file and one JSON
config per model, plus the tokenizer's word list and the UNet's panel LoRA.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import InputError, ModelError

DEFAULT_ASSETS = Path(__file__).resolve().parent / "assets" / "default"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_SUFFIX = "</w>"
MAX_PROMPT_TOKENS = 77  # the length StableDiffusionPipeline pads every prompt to


# ---------------------------------------------------------------------------------------------
# configs


class _Config:
    """JSON round trip for the frozen config dataclasses below (tuples come back from lists)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ModelError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class VaeConfig(_Config):
    sample_size: int = 64
    # One fewer downsampling than entries: (32, 64, 64) -> factor 4, 64x64 pixels -> 16x16 latents.
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 8  # more channels than SD's 4: patterns of 1-2 px must survive factor 4
    norm_num_groups: int = 16
    scaling_factor: float = 1.0  # set from data after training: 1 / std of the latents


@dataclass(frozen=True)
class TextConfig(_Config):
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    projection_dim: int = 128


@dataclass(frozen=True)
class VisionConfig(_Config):
    image_size: int = 64  # references and scenes are 64x64
    patch_size: int = 8  # 8x8 patches -> 64 tokens + CLS (the QFormer reads all 65)
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    projection_dim: int = 128


@dataclass(frozen=True)
class UNetConfig(_Config):
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 32  # channels per head
    # Which levels attend to the text; the 16x16 level has the most pixels and costs the most.
    cross_attention_levels: tuple[bool, ...] = (True, True, True)
    norm_num_groups: int = 16


# ---------------------------------------------------------------------------------------------
# VAE


def build_vae(config: VaeConfig):
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, sample_size=config.sample_size,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scaling_factor,
    )


def vae_factor(config: VaeConfig) -> int:
    return 2 ** (len(config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + WORD_SUFFIX]


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one word: repeatedly merge the lowest-ranked adjacent pair (leftmost on ties)."""
    parts = _symbols(word)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that turn every word into the single token `word</w>`.

    CLIP's BPE starts from characters and only joins what its merges say, so "no merges" would
    leave every word as letters. Each word gets merges appended until it reduces to one piece;
    a merge appended later has a higher rank than all before it, so it never changes how an
    earlier word reduces.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _apply_merges(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            parts = _apply_merges(word, ranks)
    return list(ranks)


def tokenizer_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges): the world's words first (ids 0..), then BPE pieces, then the start and
    end tokens; end-of-text is the largest id because CLIPTextModel pools at it."""
    merges = word_merges(words)
    whole = [w + WORD_SUFFIX for w in words]
    pieces: set[str] = set()
    for word in words:
        pieces.update(_symbols(word))
    for a, b in merges:
        pieces.update((a, b, a + b))
    letters = "abcdefghijklmnopqrstuvwxyz"  # so unknown words still tokenize (and are reported)
    pieces.update(letters)
    pieces.update(c + WORD_SUFFIX for c in letters)
    ordered = whole + sorted(pieces - set(whole)) + [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(ordered)}, merges


def build_tokenizer(words: list[str]):
    """A real `CLIPTokenizer`, in memory, in which every word of `words` (the sprite world's
    vocabulary, `anystory_cli.lab.world.vocabulary()`) is exactly one token."""
    from transformers import CLIPTokenizer

    words = sorted(set(words))
    vocab, merges = tokenizer_vocab(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)
    # transformers 5 silently builds a broken tokenizer from bad inputs: check what we got.
    if len(tokenizer) != len(vocab) or tokenizer.eos_token_id != len(vocab) - 1:
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if ids != [vocab[word + WORD_SUFFIX]]:
            raise ModelError(f"tokenizer splits the vocabulary word {word!r} into {ids}")
    return tokenizer


def prompt_words(tokenizer, prompt: str) -> list[str]:
    """The words the tokenizer sees in `prompt` (its own normalizer and pre-tokenizer)."""
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(prompt)
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` that are not one token of the vocabulary, in order, without repeats."""
    vocab = tokenizer.get_vocab()
    unknown: list[str] = []
    for word in prompt_words(tokenizer, prompt):
        if word + WORD_SUFFIX not in vocab and word not in unknown:
            unknown.append(word)
    return unknown


def check_prompt(tokenizer, prompt: str, where: str = "prompt") -> None:
    """Raise InputError naming the unknown words (the model would otherwise draw nonsense)."""
    unknown = unknown_words(tokenizer, prompt)
    if unknown:
        words = ", ".join(repr(w) for w in unknown)
        raise InputError(f"{where}: the default model does not know the word(s) {words}; "
                         f"use words of its vocabulary (`anystory_cli.lab.world.vocabulary()`)")
    if len(tokenizer(prompt).input_ids) > MAX_PROMPT_TOKENS:
        raise InputError(f"{where}: longer than {MAX_PROMPT_TOKENS - 2} words")


# ---------------------------------------------------------------------------------------------
# CLIP towers


def text_model_config(config: TextConfig, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=MAX_PROMPT_TOKENS, projection_dim=config.projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def vision_model_config(config: VisionConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, projection_dim=config.projection_dim,
    )


def build_text_encoder(config: TextConfig, tokenizer):
    from transformers import CLIPTextModel

    return CLIPTextModel(text_model_config(config, tokenizer))


def build_image_encoder(config: VisionConfig):
    from transformers import CLIPVisionModel

    return CLIPVisionModel(vision_model_config(config))


def build_clip(text: TextConfig, vision: VisionConfig, tokenizer):
    """The two towers with their projections and temperature, for contrastive training."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=text_model_config(text, tokenizer).to_dict(),
        vision_config=vision_model_config(vision).to_dict(),
        projection_dim=text.projection_dim,
    )
    return CLIPModel(config)


# ---------------------------------------------------------------------------------------------
# UNet and scheduler


def build_unet(config: UNetConfig, vae: VaeConfig, text: TextConfig):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in config.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(config.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=vae.sample_size // vae_factor(vae), in_channels=vae.latent_channels,
        out_channels=vae.latent_channels, layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels, down_block_types=down, up_block_types=up,
        attention_head_dim=tuple(c // config.attention_head_dim for c in config.block_out_channels),
        norm_num_groups=config.norm_num_groups, cross_attention_dim=text.hidden_size,
    )


def scheduler_config() -> dict:
    """Training and sampling share this: v-prediction, SD's scaled-linear betas, zero terminal SNR
    so that the last step really starts from noise (flat skies otherwise keep a grey cast)."""
    return dict(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_config())


def build_training_scheduler():
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config().items() if k not in ("set_alpha_to_one",)}
    return DDPMScheduler(**config)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """A standard `StableDiffusionPipeline` over the given parts (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# shipped assets: <name>.safetensors (fp16) + <name>.json (the dataclass config)

ASSET_CONFIGS = {"vae": VaeConfig, "text_encoder": TextConfig, "image_encoder": VisionConfig, "unet": UNetConfig}


def save_asset(name: str, module: torch.nn.Module, config: _Config, folder: Path = DEFAULT_ASSETS,
               dtype: torch.dtype = torch.float16, extra_config: dict | None = None) -> Path:
    """Write one model's weights (cast to `dtype`) and its config, each atomically."""
    folder = Path(folder)
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(folder / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": f"anystory-base-{name}/1"})
    write_json(folder / f"{name}.json", {**config.to_dict(), **(extra_config or {})})
    return folder / f"{name}.safetensors"


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


RECIPE_OF = {"vae": "base_vae", "text_encoder": "base_clip", "image_encoder": "base_clip", "unet": "base_unet"}


def _missing(path: Path, name: str) -> ModelError:
    return ModelError(f"{path}: missing; the default base model is not trained yet (run "
                      f"`anystory train recipes/{RECIPE_OF[name]}.yaml`)")


def read_config(name: str, folder: Path = DEFAULT_ASSETS) -> _Config:
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise _missing(path, name)
    data = json.loads(path.read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_trained_steps" etc.
    return ASSET_CONFIGS[name].from_dict(data)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A shipped safetensors file as float32 tensors; ModelError naming it when it is damaged."""
    from safetensors import SafetensorError

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: damaged weights file ({exc}); reinstall the package") from None


def load_weights(module: torch.nn.Module, name: str, folder: Path = DEFAULT_ASSETS) -> torch.nn.Module:
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise _missing(path, name)
    state = read_weights(path)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match {name}.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval()


def write_vocab(words: list[str], folder: Path = DEFAULT_ASSETS) -> Path:
    path = Path(folder) / "tokenizer_words.json"
    write_json(path, sorted(set(words)))
    return path


def load_tokenizer(folder: Path = DEFAULT_ASSETS):
    path = Path(folder) / "tokenizer_words.json"
    if not path.is_file():
        raise _missing(path, "text_encoder")
    return build_tokenizer(json.loads(path.read_text()))


def load_vae(folder: Path = DEFAULT_ASSETS):
    return load_weights(build_vae(read_config("vae", folder)), "vae", folder)


def load_text_encoder(tokenizer, folder: Path = DEFAULT_ASSETS):
    return load_weights(build_text_encoder(read_config("text_encoder", folder), tokenizer), "text_encoder", folder)


def load_image_encoder(folder: Path = DEFAULT_ASSETS):
    return load_weights(build_image_encoder(read_config("image_encoder", folder)), "image_encoder", folder)


def load_unet(folder: Path = DEFAULT_ASSETS):
    unet = build_unet(read_config("unet", folder), read_config("vae", folder), read_config("text_encoder", folder))
    return load_weights(unet, "unet", folder)


def load_default_base(folder: Path | str = DEFAULT_ASSETS, dtype: torch.dtype = torch.float32,
                      panel_weights: bool = True):
    """(StableDiffusionPipeline, CLIPVisionModel) rebuilt offline from the shipped assets.
    `panel_weights`: the UNet draws wide and tall panels with its panel LoRA where the folder
    has one (`load_panel_lora`); adapter training, on squares only, leaves it out."""
    folder = Path(folder)
    tokenizer = load_tokenizer(folder)
    unet = load_unet(folder)
    if panel_weights:
        load_panel_lora(unet, folder)
    pipe = assemble_pipeline(load_vae(folder), load_text_encoder(tokenizer, folder), tokenizer, unet)
    image_encoder = load_image_encoder(folder)
    return pipe.to(dtype=dtype), image_encoder.to(dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the panel LoRA: the UNet's weights for wide and tall panels
#
# Trained on squares only, the UNet crowds a wide panel's characters into one another; trained
# on every shape (four runs, recipes/base_unet_shapes.yaml), it learns them at the square's
# expense. A LoRA trained on the other shapes over the frozen UNet leaves the square exactly as
# it was: it is switched on for a forward whose latents are not square and off otherwise.

PANEL_LORA = "unet_panels"  # unet_panels.safetensors + unet_panels.json in the assets
PANEL_ADAPTER = "panels"
# Attention projections and the resnets' convolutions: where a layout is decided.
PANEL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                      "conv1", "conv2", "conv_shortcut")


def panel_lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(PANEL_LORA_TARGETS))


def add_panel_lora(unet, rank: int) -> None:
    """Add an untrained panel LoRA (zero update: B starts at zero) to `unet`, switched on."""
    unet.add_adapter(panel_lora_config(rank), adapter_name=PANEL_ADAPTER)


def save_panel_lora(unet, rank: int, folder: Path, extra_config: dict | None = None) -> Path:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=PANEL_ADAPTER)
    tensors = {k: v.detach().half().contiguous().cpu() for k, v in state.items()}
    path = Path(folder) / f"{PANEL_LORA}.safetensors"
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": f"anystory-base-{PANEL_LORA}/1"})
    write_json(Path(folder) / f"{PANEL_LORA}.json", {"rank": rank, **(extra_config or {})})
    return path


def load_panel_lora(unet, folder: Path = DEFAULT_ASSETS) -> bool:
    """Give `unet` the folder's panel LoRA, used for non-square latents only; False without one.

    The LoRA is merged (by PEFT) into a copy of the layers it adapts once, here; a forward whose
    latents change between square and not square swaps those weights in place. The UNet stays a
    plain diffusers UNet: no LoRA matmuls at each step, and squares run on exactly its weights."""
    path, config = Path(folder) / f"{PANEL_LORA}.safetensors", Path(folder) / f"{PANEL_LORA}.json"
    if not path.is_file():
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict

    merged = copy.deepcopy(unet)
    add_panel_lora(merged, json.loads(config.read_text())["rank"])
    result = set_peft_model_state_dict(merged, read_weights(path), adapter_name=PANEL_ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"{path}: does not fit the UNet (unexpected {result.unexpected_keys[:3]})")
    panel_weights = {}
    for name, module in merged.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[PANEL_ADAPTER])
            panel_weights[f"{name}.weight"] = module.get_base_layer().weight.detach().clone()
    swap = _PanelWeights(unet, panel_weights)
    unet.register_forward_pre_hook(lambda module, args, kwargs: swap.use(_non_square(args, kwargs)), with_kwargs=True)
    return True


def _non_square(args, kwargs) -> bool:
    sample = args[0] if args else kwargs["sample"]
    return sample.shape[-1] != sample.shape[-2]


class _PanelWeights:
    """The adapted layers' two weight sets, the one not in use kept aside; `use` swaps them."""

    def __init__(self, unet, panel_weights: dict):
        self.parameters = {name: p for name, p in unet.named_parameters() if name in panel_weights}
        if len(self.parameters) != len(panel_weights):
            raise ModelError("the panel LoRA adapts layers this UNet does not have")
        self.aside = panel_weights
        self.panel_in_use = False

    @torch.no_grad()
    def use(self, panel: bool) -> None:
        if panel == self.panel_in_use:
            return
        for name, parameter in self.parameters.items():
            incoming = self.aside[name].to(device=parameter.device, dtype=parameter.dtype)  # after pipe.to()
            self.aside[name] = parameter.data
            parameter.data = incoming
        self.panel_in_use = panel

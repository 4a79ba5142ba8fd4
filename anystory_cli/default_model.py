"""The default model's base components, built from small dataclass configs.

Real diffusers / transformers classes only, so that everything downstream (StableDiffusionPipeline,
the AnyStory adapter, the image-feature path) runs the same code on these tiny models as on SD 1.5
or SDXL:

    build_vae(VaeConfig())                 -> diffusers.AutoencoderKL
    build_tokenizer(words)                 -> transformers.CLIPTokenizer, one token per world word
    build_text_encoder(TextConfig(), tok)  -> transformers.CLIPTextModel
    build_image_encoder(VisionConfig())    -> transformers.CLIPVisionModel
    build_unet(UNetConfig(), vae, text)    -> diffusers.UNet2DConditionModel
    build_scheduler()                      -> diffusers.DDIMScheduler (v-prediction)
    assemble_pipeline(...)                 -> diffusers.StableDiffusionPipeline (safety_checker=None)
    save_asset(name, module, config)       -> the part's subfolder of the published model folder
    load_default_base()                    -> (pipeline, image encoder) of the published folder

The published model is `anystory_cli/assets/default/`, a standard diffusers folder (fp16 parts
written with `save_pretrained`, a saved tokenizer, the UNet's panel LoRA in diffusers' LoRA
format) that `model_loading` loads like any other model folder.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .atomic import atomic_path, replaced_folder
from .errors import InputError, ModelError
from .model_loading import PANEL_ADAPTER, PANEL_LORA_FILE, PIPELINE_INDEX, WORD_SUFFIX, load_base, unknown_words

DEFAULT_ASSETS = Path(__file__).resolve().parent / "assets" / "default"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
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
# the published model: a standard diffusers folder (`model_loading` loads it like any other)
#
#   model_index.json  scheduler/  tokenizer/  vae/  text_encoder/  unet/   (save_pretrained, fp16)
#   image_encoder/                     a CLIPVisionModel (save_pretrained, fp16)
#   anystory_panel_lora.safetensors    the UNet's LoRA for wide and tall panels (diffusers format)
#   training_status.json               how far each part has trained: {"vae": {"step", "final"}, ...}

PARTS = ("vae", "text_encoder", "image_encoder", "unet")
ASSET_CONFIGS = {"vae": VaeConfig, "text_encoder": TextConfig, "image_encoder": VisionConfig, "unet": UNetConfig}
STATUS_FILE = "training_status.json"
PANEL_LORA = "unet_panels"  # the trainer's name for the panel LoRA (its status entry and run)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_pipeline_files(folder: Path) -> None:
    """model_index.json and scheduler/: what makes the folder a StableDiffusionPipeline's."""
    import diffusers

    build_scheduler().save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    write_json(folder / PIPELINE_INDEX, index)


def write_status(folder: Path, name: str, status: dict) -> None:
    path = Path(folder) / STATUS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**data, name: status})


def read_status(folder: Path, name: str) -> dict:
    path = Path(folder) / STATUS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    return data.get(name, {"step": 0, "final": False})


def save_asset(name: str, module: torch.nn.Module, config: _Config, folder: Path = DEFAULT_ASSETS,
               dtype: torch.dtype = torch.float16, status: dict | None = None) -> Path:
    """Write one part (cast to `dtype`) into its subfolder with `save_pretrained`, replacing the
    subfolder at once (a reader never sees half of it); `config` is the dataclass it was built
    from (its values are in the part's own config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with replaced_folder(folder / name) as tmp:
        copy.deepcopy(module).to(dtype).save_pretrained(str(tmp), safe_serialization=True)
    _write_pipeline_files(folder)
    if status is not None:
        write_status(folder, name, status)
    return folder / name


RECIPE_OF = {"vae": "base_vae", "text_encoder": "base_clip", "image_encoder": "base_clip", "unet": "base_unet",
             "tokenizer": "base_clip"}


def _missing(path: Path, name: str) -> ModelError:
    return ModelError(f"{path}: missing; the default base model is not trained yet (run "
                      f"`anystory train recipes/{RECIPE_OF[name]}.yaml`)")


def read_config(name: str, folder: Path = DEFAULT_ASSETS) -> _Config:
    """The dataclass config of a published part, read back from its config.json."""
    path = Path(folder) / name / "config.json"
    if not path.is_file():
        raise _missing(path, name)
    data = json.loads(path.read_text())
    if name == "unet":
        return UNetConfig(block_out_channels=tuple(data["block_out_channels"]),
                          layers_per_block=data["layers_per_block"],
                          attention_head_dim=data["block_out_channels"][0] // _first(data["attention_head_dim"]),
                          cross_attention_levels=tuple(t.startswith("CrossAttn") for t in data["down_block_types"]),
                          norm_num_groups=data["norm_num_groups"])
    cls = ASSET_CONFIGS[name]
    return cls(**{f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
                  for f in fields(cls)})


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _load_part(cls, name: str, folder: Path, **kwargs):
    path = Path(folder) / name
    if not (path / "config.json").is_file():
        raise _missing(path, name)
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **kwargs).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{path}: damaged weights ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                         "reinstall the package or publish it again") from None


def write_vocab(words: list[str], folder: Path = DEFAULT_ASSETS) -> Path:
    """The tokenizer of `words` (the sprite world's vocabulary), saved with `save_pretrained`."""
    path = Path(folder) / "tokenizer"
    tokenizer = build_tokenizer(words)
    with replaced_folder(path) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return path


def load_tokenizer(folder: Path = DEFAULT_ASSETS):
    from transformers import CLIPTokenizer

    path = Path(folder) / "tokenizer"
    if not path.is_dir():
        raise _missing(path, "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tokenizer) < 10 or tokenizer.eos_token_id != len(tokenizer) - 1:
        raise ModelError(f"{path}: a broken tokenizer ({len(tokenizer)} tokens, end-of-text id "
                         f"{tokenizer.eos_token_id}); publish it again")
    return tokenizer


def load_vae(folder: Path = DEFAULT_ASSETS):
    from diffusers import AutoencoderKL

    return _load_part(AutoencoderKL, "vae", folder, torch_dtype=torch.float32)


def load_text_encoder(tokenizer=None, folder: Path = DEFAULT_ASSETS):
    from transformers import CLIPTextModel

    return _load_part(CLIPTextModel, "text_encoder", folder, dtype=torch.float32)


def load_image_encoder(folder: Path = DEFAULT_ASSETS):
    from transformers import CLIPVisionModel

    return _load_part(CLIPVisionModel, "image_encoder", folder, dtype=torch.float32)


def load_unet(folder: Path = DEFAULT_ASSETS):
    from diffusers import UNet2DConditionModel

    return _load_part(UNet2DConditionModel, "unet", folder, torch_dtype=torch.float32)


def load_default_base(folder: Path | str = DEFAULT_ASSETS, dtype: torch.dtype = torch.float32,
                      panel_weights: bool = True):
    """(StableDiffusionPipeline, CLIPVisionModel) of the published folder, offline, through the
    loader every model folder goes through. `panel_weights`: the UNet draws wide and tall panels
    with its panel LoRA where the folder has one; adapter training, on squares only, leaves it out."""
    folder = Path(folder)
    for name in PARTS:
        if not (folder / name / "config.json").is_file():
            raise _missing(folder / name, name)
    if not (folder / "tokenizer").is_dir():
        raise _missing(folder / "tokenizer", "tokenizer")
    return load_base(folder, dtype, panel_lora=panel_weights)


# ---------------------------------------------------------------------------------------------
# the panel LoRA: the UNet's weights for wide and tall panels
#
# Trained on squares only, the UNet crowds a wide panel's characters into one another; trained
# on every shape (four runs, recipes/base_unet_shapes.yaml), it learns them at the square's
# expense. A LoRA trained on the other shapes over the frozen UNet leaves the square exactly as
# it was: the loader switches it on for a forward whose latents are not square and off otherwise.

# Attention projections and the resnets' convolutions: where a layout is decided.
PANEL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                      "conv1", "conv2", "conv_shortcut")


def panel_lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(PANEL_LORA_TARGETS))


def add_panel_lora(unet, rank: int) -> None:
    """Add an untrained panel LoRA (zero update: B starts at zero) to `unet`, switched on."""
    unet.add_adapter(panel_lora_config(rank), adapter_name=PANEL_ADAPTER)


def save_panel_lora(unet, rank: int, folder: Path, status: dict | None = None) -> Path:
    """The panel LoRA in diffusers' LoRA format (fp16), loadable with `load_lora_weights`."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=PANEL_ADAPTER)
    tensors = {k: v.detach().half().contiguous().cpu() for k, v in state.items()}
    path = Path(folder) / PANEL_LORA_FILE
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": list(PANEL_LORA_TARGETS)}
    with atomic_path(path) as tmp:
        StableDiffusionPipeline.save_lora_weights(str(tmp.parent), unet_lora_layers=tensors, weight_name=tmp.name,
                                                  unet_lora_adapter_metadata=metadata)
    if status is not None:
        write_status(folder, PANEL_LORA, status)
    return path

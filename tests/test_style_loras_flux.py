"""Style LoRAs on the FLUX AnyStory pipeline: on the image stream, off the reference stream, and
gone after, with the model's own reference and router LoRAs as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import storykit
from anystory_cli.errors import ModelError

FIXTURE = storykit.FLUX_FIXTURE
CASES = storykit.flux_cases()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture(scope="module")
def pipe():
    return storykit.tiny_flux_pipeline()


def flux_lora(pipe, folder: Path, seed: int = 1) -> Path:
    """A random LoRA for the tiny FLUX transformer, saved by diffusers as safetensors."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_config(pipe.transformer.config)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v"]))
    FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   weight_name="flux_ink.safetensors")
    return folder / "flux_ink.safetensors"


def draw(pipe, with_character: bool = True) -> torch.Tensor:
    common = CASES["common"]
    characters = []
    if with_character:
        files = CASES["subjects"][sorted(CASES["subjects"])[0]]
        image, mask = Image.open(FIXTURE / files["image"]), Image.open(FIXTURE / files["mask"])
        characters = [pipe.encode_character(image, mask, generator=torch.Generator().manual_seed(0))]
    return pipe(CASES["prompt"], characters=characters, generator=torch.Generator("cpu").manual_seed(common["seed"]),
                num_inference_steps=common["num_inference_steps"], height=common["height"], width=common["width"],
                guidance_scale=common["guidance_scale"], output_type="latent").images[0]


def test_a_style_lora_on_flux_draws_with_it_and_goes_without_a_trace(pipe, tmp_path):
    own = pipe.get_list_adapters()
    before, plain = draw(pipe), draw(pipe, with_character=False)
    name = pipe.load_lora_weights(flux_lora(pipe, tmp_path), adapter_name="ink")
    assert name == "ink"
    assert not torch.equal(draw(pipe), before)
    assert not torch.equal(draw(pipe, with_character=False), plain)
    pipe.set_adapters("ink", 0.0)  # weight 0: as without it, the character's own LoRAs untouched
    assert torch.equal(draw(pipe), before)
    pipe.set_adapters("ink", 1.0)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == own
    assert torch.equal(draw(pipe), before)
    assert torch.equal(draw(pipe, with_character=False), plain)


def test_an_sd_lora_on_flux_is_one_error_naming_it(pipe, tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "sd_ink.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(file))
    own = pipe.get_list_adapters()
    with pytest.raises(ModelError, match="sd_ink.safetensors") as caught:
        pipe.load_lora_weights(file)
    assert "\n" not in str(caught.value)
    assert pipe.get_list_adapters() == own

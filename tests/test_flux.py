"""AnyStory on FLUX.1: parity with the released code on tiny random models, and the pipeline's
contract (plain calls stay plain, encodings are reusable, bad files are refused in one line).

The fixture (tests/data/flux_tiny) holds tiny random FLUX, Redux and AnyStory weights in the
released layout, subject images, the cases' inputs (cases.json) and the released code's final
latents for each case (golden.safetensors), made by reference/tiny_flux.py."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import storykit
import torch
from PIL import Image

FIXTURE = storykit.FLUX_FIXTURE
MODEL = storykit.FLUX_MODEL
CASES = storykit.flux_cases()
REFERENCE = Path(os.environ.get("ANYSTORY_FLUX_REFERENCE",
                                Path(__file__).resolve().parents[2] / "shared" / "reference"))
TOLERANCE = 1e-4

# The released generate()'s argument names -> this pipeline's.
RELEASED_NAMES = {"enable_router": "router", "redux_scale": "redux_scale", "ref_shift": "reference_shift",
                  "enable_ref_mask": "reference_mask"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture(scope="module")
def pipe():
    return storykit.tiny_flux_pipeline()


subject = storykit.flux_subject


def our_options(options: dict) -> dict:
    """The released generate()'s options as this pipeline's keyword arguments."""
    options = dict(options)
    out = {RELEASED_NAMES[k]: options.pop(k) for k in list(options) if k in RELEASED_NAMES}
    out.setdefault("router", False)  # the released default; ours is "on with two or more"
    out["reference_window"] = (options.pop("ref_start_at", 0.0), options.pop("ref_end_at", 1.0))
    out["redux_window"] = (options.pop("redux_start_at", 0.1), options.pop("redux_end_at", 0.3))
    assert not options, f"unmapped options {options}"
    return out


def draw(pipe, subjects: list[str], options: dict, common: dict = CASES["common"], prompt: str = CASES["prompt"]):
    g = torch.Generator().manual_seed(common["seed"])
    characters = [pipe.encode_character(*subject(name), generator=g) for name in subjects]
    return pipe(prompt, characters=characters, generator=torch.Generator("cpu").manual_seed(common["seed"]),
                num_inference_steps=common["num_inference_steps"], height=common["height"], width=common["width"],
                guidance_scale=common["guidance_scale"], output_type="latent", **our_options(options)).images[0]


@pytest.mark.parametrize("case", sorted(CASES["cases"]))
def test_final_latents_equal_the_released_code(pipe, case):
    from safetensors.torch import load_file
    golden = load_file(str(FIXTURE / "golden.safetensors"))
    spec = CASES["cases"][case]
    latents = draw(pipe, spec["subjects"], spec["options"])
    assert latents.shape == golden[case].shape
    assert (latents - golden[case]).abs().max().item() < TOLERANCE


def test_each_lora_part_lands_on_the_layers_its_stream_uses(pipe):
    # x_embedder / context_embedder, six layers per double block and six per single block
    assert pipe.lora_layers == {"ref": 13, "router": 13}


def test_the_cases_differ_by_more_than_the_tolerance():
    """Parity within 1e-4 means something only if the characters move the latents further."""
    from safetensors.torch import load_file
    golden = load_file(str(FIXTURE / "golden.safetensors"))
    assert (golden["one"] - golden["none"]).abs().max() > 100 * TOLERANCE
    assert (golden["two"] - golden["one"]).abs().max() > 10 * TOLERANCE


LIVE_CASES = {
    # every option away from its default, with one and with two characters
    "one_all_options": {"subjects": ["blue"], "options": {
        "enable_router": True, "redux_scale": 1.0, "redux_start_at": 0.0, "redux_end_at": 0.5, "ref_shift": 0.5,
        "enable_ref_mask": False, "ref_start_at": 0.2, "ref_end_at": 0.8}},
    "two_no_router_shifted": {"subjects": ["blue", "red"], "options": {
        "enable_router": False, "ref_shift": -0.3, "redux_start_at": 0.3, "redux_end_at": 1.0, "ref_start_at": 0.0}},
    "two_router_masked": {"subjects": ["red", "blue"], "options": {
        "enable_router": True, "redux_scale": 0.8, "ref_start_at": 0.09, "ref_end_at": 0.7, "redux_end_at": 0.6}},
}


@pytest.mark.skipif(not (REFERENCE / "tiny_flux.py").is_file(), reason="the released code is not on this machine")
def test_final_latents_equal_the_released_code_live(pipe):
    """The released code itself, run now, on options the fixture does not hold."""
    spec = importlib.util.spec_from_file_location("tiny_flux_reference", REFERENCE / "tiny_flux.py")
    tiny_flux = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_flux)
    with torch.random.fork_rng():  # the released generate() seeds the global generator
        released = tiny_flux.load_official(MODEL, reference_size=CASES["reference_size"])
        subjects = {name: subject(name) for name in CASES["subjects"]}
        for name, case in LIVE_CASES.items():
            expected = tiny_flux.run_official(released, subjects, case, prompt=CASES["prompt"],
                                              common=CASES["common"])
            ours = draw(pipe, case["subjects"], case["options"])
            assert (ours - expected).abs().max().item() < TOLERANCE, name
    for name in [m for m in sys.modules if m == "anystory" or m.startswith("anystory.")]:
        sys.modules.pop(name)


def test_a_plain_flux_call_with_the_processors_installed_is_exactly_plain(pipe):
    from diffusers import FluxPipeline
    plain = FluxPipeline.from_pretrained(str(MODEL / "flux"))
    plain.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "a ball", "num_inference_steps": 3, "height": 64, "width": 64, "output_type": "latent"}
    expected = plain(generator=torch.Generator().manual_seed(3), **kwargs).images
    got = FluxPipeline.from_pipe(pipe)(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert type(pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"]).__name__ \
        == "AnyStoryFluxAttnProcessor"
    assert torch.equal(got, expected)


def test_an_encoding_saved_and_loaded_draws_as_a_fresh_one(pipe, tmp_path):
    from anystory_cli.flux import FluxCharacter
    g = torch.Generator().manual_seed(5)
    red = pipe.encode_character(*subject("red"), generator=g, name="red")
    red.save(tmp_path / "red.safetensors")
    loaded = FluxCharacter.load(tmp_path / "red.safetensors")
    assert loaded.name == "red" and loaded.reference_size == CASES["reference_size"]
    fresh = pipe.encode_character(*subject("red"), generator=torch.Generator().manual_seed(5))
    kwargs = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "latent", "router": True}
    a = pipe("a ball", characters=[loaded], generator=torch.Generator().manual_seed(1), **kwargs).images
    b = pipe("a ball", characters=[fresh], generator=torch.Generator().manual_seed(1), **kwargs).images
    c = pipe("a ball", characters=[loaded], generator=torch.Generator().manual_seed(1), **kwargs).images
    assert torch.equal(a, b) and torch.equal(a, c)


def test_no_global_random_state_is_touched(pipe):
    state = torch.random.get_rng_state()
    g = torch.Generator().manual_seed(0)
    red = pipe.encode_character(*subject("red"), generator=g)
    pipe("a ball", characters=[red], generator=torch.Generator().manual_seed(0), num_inference_steps=2,
         height=64, width=64, output_type="latent")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_routing_maps_cover_each_pixel_once(pipe):
    g = torch.Generator().manual_seed(0)
    characters = [pipe.encode_character(*subject(n), generator=g) for n in ("red", "blue")]
    out = pipe("two balls", characters=characters, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
               height=64, width=64, output_type="latent", return_routing=True)
    assert out.routing_maps.shape == (1, 2, 64, 64)
    assert torch.allclose(out.routing_maps.sum(dim=1), torch.ones(1, 64, 64), atol=1e-5)


def test_the_reference_crop_puts_the_subject_on_white_in_a_square():
    from anystory_cli.flux import prepare_reference
    image = Image.new("RGB", (200, 100), (10, 200, 10))
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (120, 20, 170, 80))  # a 50x60 box
    crop, cut = prepare_reference(image, mask)
    assert crop.size == cut.size == (62, 62)  # round(60 * 1.04)
    pixels = crop.load()
    assert pixels[31, 31] == (10, 200, 10) and pixels[0, 31] == (255, 255, 255)
    assert cut.getextrema() == (0, 255)


def test_a_lora_part_with_alphas_is_read_as_diffusers_reads_it(tmp_path):
    """The same reference LoRA written with doubled up-projections and alpha = rank / 2 (scale
    1/2): diffusers' normalisation applies the alphas, so it draws exactly as the original."""
    from safetensors.torch import load_file

    from anystory_cli.flux import AnyStoryFluxPipeline
    checkpoint = _checkpoint()
    part = {}
    for key, value in checkpoint["ref"].items():
        part[key] = value * 2 if ".lora_B." in key else value
        if ".lora_B." in key:
            part[key.replace(".lora_B.weight", ".alpha")] = torch.tensor(value.shape[1] / 2.0)
    checkpoint["ref"] = part
    torch.save(checkpoint, tmp_path / "alphas.bin")
    pipe = AnyStoryFluxPipeline.from_pretrained(MODEL / "flux", redux=MODEL / "redux", adapter=tmp_path / "alphas.bin",
                                                reference_size=CASES["reference_size"], device="cpu")
    golden = load_file(str(FIXTURE / "golden.safetensors"))
    assert (draw(pipe, ["red"], {}) - golden["one"]).abs().max().item() < TOLERANCE


# ---------------------------------------------------------------------- bad input
def _error(**kwargs):
    from anystory_cli.errors import ModelError
    from anystory_cli.flux import AnyStoryFluxPipeline
    args = {"base": MODEL / "flux", "redux": MODEL / "redux", "adapter": MODEL / "anystory_flux.bin",
                "reference_size": CASES["reference_size"], "device": "cpu"}
    args.update(kwargs)
    with pytest.raises(ModelError) as info:
        AnyStoryFluxPipeline.from_pretrained(**args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_missing_redux_folder_is_named(tmp_path):
    message = _error(redux=tmp_path / "FLUX.1-Redux-dev")
    assert "FLUX.1-Redux-dev" in message and "not found" in message
    (tmp_path / "redux").mkdir()
    assert "missing image_encoder/" in _error(redux=tmp_path / "redux")


def test_an_sdxl_folder_is_not_a_flux_base(tmp_path):
    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    message = _error(base=folder)
    assert str(folder) in message and "StableDiffusionXLPipeline" in message and "not FLUX.1" in message


def _checkpoint():
    return torch.load(MODEL / "anystory_flux.bin", weights_only=True)


def test_an_adapter_for_another_width_is_refused(tmp_path):
    checkpoint = _checkpoint()
    for key in list(checkpoint["ref"]):
        value = checkpoint["ref"][key]
        checkpoint["ref"][key] = torch.zeros(value.shape[0], value.shape[1] * 2) if "lora_A" in key else value
    torch.save(checkpoint, tmp_path / "wide.bin")
    message = _error(adapter=tmp_path / "wide.bin")
    assert "wide.bin" in message and "'ref'" in message and "another model" in message


def test_a_truncated_adapter_is_refused(tmp_path):
    data = (MODEL / "anystory_flux.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    message = _error(adapter=tmp_path / "cut.bin")
    assert "cut.bin" in message and "truncated" in message


class Payload:  # weights_only loading refuses any class it does not know
    pass


def test_an_adapter_holding_code_is_refused(tmp_path):
    torch.save({"ref": {}, "redux": {}, "router": {}, "extra": Payload()}, tmp_path / "code.bin")
    message = _error(adapter=tmp_path / "code.bin")
    assert "code.bin" in message and "more than tensors" in message


def test_a_lora_part_that_lands_nowhere_is_refused(tmp_path):
    checkpoint = _checkpoint()
    checkpoint["ref"] = {k[len("transformer."):]: v for k, v in checkpoint["ref"].items()}
    torch.save(checkpoint, tmp_path / "bare.bin")
    message = _error(adapter=tmp_path / "bare.bin")
    assert "bare.bin" in message and "part 'ref' lands on no layer" in message


def test_characters_with_several_different_prompts_are_refused(pipe):
    from anystory_cli.errors import InputError
    red = pipe.encode_character(*subject("red"), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="one prompt per call"):
        pipe(["a ball", "two balls"], characters=[red], num_inference_steps=1, height=64, width=64)

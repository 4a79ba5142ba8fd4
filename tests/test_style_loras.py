"""Style LoRAs on the AnyStory pipelines: diffusers' adapter API, beside the model's own weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tiny
from anystory_cli.errors import InputError, ModelError
from anystory_cli.loras import lora_fingerprint, resolve_lora

STEPS = 2
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(base, folder, name="style.safetensors", seed=1, rank=4, targets=TARGETS, text_encoder=False):
    """A random LoRA for `base`'s UNet (and text encoder), saved by diffusers as safetensors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = copy.deepcopy(base.unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets))
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    if text_encoder:
        from peft import inject_adapter_in_model

        encoder = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
            copy.deepcopy(base.text_encoder))
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    type(base).save_lora_weights(str(folder), weight_name=name, **layers)
    return folder / name


def draw(pipe, characters=(), prompt="a red blob on grass", **kwargs):
    return pipe(prompt, characters=characters, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def lora_file(story_pipe, tmp_path_factory):
    return make_lora(story_pipe.base, tmp_path_factory.mktemp("lora"), text_encoder=True)


def plain_modules(pipe):
    return {name: sorted(dict(model.named_parameters())) for name, model in
            (("unet", pipe.base.unet), ("text_encoder", pipe.base.text_encoder))}


@pytest.mark.filterwarnings("ignore:LoRA .* text-encoder layers")
def test_a_style_lora_changes_the_picture_and_goes_without_a_trace(story_pipe, lora_file):
    character = story_pipe.encode_character(tiny.sprite())
    before, names = draw(story_pipe, [character]), plain_modules(story_pipe)
    name = story_pipe.load_lora_weights(lora_file, adapter_name="ink")
    assert name == "ink" and story_pipe.get_active_adapters() == ["ink"]
    styled = draw(story_pipe, [character])
    assert not np.array_equal(styled, before)
    story_pipe.set_adapters("ink", 0.0)
    assert np.array_equal(draw(story_pipe, [character]), before)  # weight 0 == no LoRA
    story_pipe.set_adapters(["ink"], [1.0])
    assert np.array_equal(draw(story_pipe, [character]), styled)
    story_pipe.delete_adapters("ink")
    assert story_pipe.base.get_list_adapters() in ({}, {"unet": [], "text_encoder": []}) or not any(
        story_pipe.base.get_list_adapters().values())
    assert plain_modules(story_pipe) == names  # the LoRA layers are unwrapped again
    assert np.array_equal(draw(story_pipe, [character]), before)


@pytest.mark.filterwarnings("ignore:LoRA .* text-encoder layers")
def test_the_scale_weights_the_lora(story_pipe, lora_file):
    before = draw(story_pipe, subject_scale=0.0)
    with story_pipe.style_loras.applied([(lora_file, 0.5)]) as names:
        half = draw(story_pipe, subject_scale=0.0)
        story_pipe.set_adapters(names, 1.0)
        full = draw(story_pipe, subject_scale=0.0)
    assert not np.array_equal(half, before) and not np.array_equal(half, full)
    assert np.abs(half - before).mean() < np.abs(full - before).mean()
    assert np.array_equal(draw(story_pipe, subject_scale=0.0), before)
    assert not story_pipe.style_loras.loaded


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_the_model_s_own_lora_stays_on_beside_a_style_and_after_it(tmp_path):
    from peft import LoraConfig

    base = tiny.tiny_sd_pipeline()
    pipe = tiny.tiny_story_pipeline(base)
    # a LoRA adapter the model carries (as a model's panel LoRA may), on before any style comes
    base.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "conv1"]),
                          adapter_name="panels")
    own = draw(pipe, subject_scale=0.0)
    style = make_lora(base, tmp_path)
    pipe.load_lora_weights(style, adapter_name="ink")
    assert sorted(base.get_active_adapters()) == ["ink", "panels"]
    both = draw(pipe, subject_scale=0.0)
    pipe.set_adapters("ink", 0.0)
    assert np.array_equal(draw(pipe, subject_scale=0.0), own)  # the panel LoRA was on all along
    pipe.unload_lora_weights()
    assert base.get_active_adapters() == ["panels"] and base.get_list_adapters() == {"unet": ["panels"]}
    assert np.array_equal(draw(pipe, subject_scale=0.0), own)
    assert not np.array_equal(both, own)


def test_a_lora_for_another_base_is_one_error_naming_the_file(tmp_path, capfd):
    sd = tiny.tiny_story_pipeline()
    xl_lora = make_lora(tiny.tiny_sdxl_pipeline(), tmp_path, name="xl_style.safetensors")
    before = draw(sd, subject_scale=0.0)
    capfd.readouterr()
    with pytest.raises(ModelError, match="xl_style.safetensors") as caught:
        sd.load_lora_weights(xl_lora)
    assert "\n" not in str(caught.value) and "another base" in str(caught.value)
    assert "size mismatch" in str(caught.value)  # what does not fit, in the one line
    assert capfd.readouterr().err == ""  # and nothing else: no library dump before it
    assert not any(sd.base.get_list_adapters().values())  # nothing left half-loaded
    assert np.array_equal(draw(sd, subject_scale=0.0), before)


def test_a_lora_whose_layers_land_nowhere_is_refused(tmp_path):
    from safetensors.torch import save_file

    sd = tiny.tiny_story_pipeline()
    file = tmp_path / "elsewhere.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}, str(file))
    with pytest.raises(ModelError, match="elsewhere.safetensors"):
        sd.load_lora_weights(file)
    assert not any(sd.base.get_list_adapters().values())


def test_lora_sources_file_folder_and_hub_id(tmp_path, monkeypatch):
    base = tiny.tiny_sd_pipeline()
    folder = tmp_path / "loras"
    file = make_lora(base, folder, name="pytorch_lora_weights.safetensors")
    assert resolve_lora(str(file)) == file
    assert resolve_lora("loras", base_dir=tmp_path) == file
    # a hub id from a cache folder in the hub's layout, offline
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--ink-style" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "ink.safetensors").write_bytes(file.read_bytes())
    (cache / "models--someone--ink-style" / "refs").mkdir()
    (cache / "models--someone--ink-style" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert resolve_lora("someone/ink-style") == snapshot / "ink.safetensors"
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        resolve_lora("someone/not-cached")
    with pytest.raises(InputError, match="no such file"):
        resolve_lora("missing.safetensors", base_dir=tmp_path)
    pickle = tmp_path / "style.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="only .safetensors"):
        resolve_lora(pickle)
    (folder / "other.safetensors").write_bytes(b"x")
    assert resolve_lora(folder) == file  # diffusers' own file name first
    (folder / "pytorch_lora_weights.safetensors").rename(folder / "a.safetensors")
    with pytest.raises(InputError, match="name the file"):
        resolve_lora(folder)


def test_the_fingerprint_follows_the_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"one")
    b.write_bytes(b"one")
    assert lora_fingerprint(a) == lora_fingerprint(b)
    b.write_bytes(b"two")
    assert lora_fingerprint(a) != lora_fingerprint(b)


def test_text_encoder_layers_load_or_are_said_to_be_left_out(tmp_path):
    from anystory_cli.loras import text_encoder_loras_supported

    pipe = tiny.tiny_story_pipeline()
    file = make_lora(pipe.base, tmp_path, text_encoder=True)
    if text_encoder_loras_supported():
        name = pipe.load_lora_weights(file)
        assert pipe.style_loras.landed(name) == 56 + 4
    else:
        with pytest.warns(UserWarning, match="4 text-encoder layers are left out"):
            name = pipe.load_lora_weights(file)
        assert pipe.style_loras.landed(name) == 56
    pipe.unload_lora_weights()
    assert not any(pipe.base.get_list_adapters().values())


# ---------------------------------------------------------------------------------------------
# the story field and the panel keys


def story_with(tmp_path, loras):
    from anystory_cli.story import validate_story

    return validate_story({"style": {"loras": loras}, "panels": [{"prompt": "a hill"}]}, base_dir=tmp_path)


def test_style_loras_in_a_story(tmp_path):
    from anystory_cli.errors import StoryError

    (tmp_path / "ink.safetensors").write_bytes(b"x")
    story = story_with(tmp_path, [{"path": "ink.safetensors", "scale": 0.8}, {"path": "someone/ink-style"}])
    first, second = story.style.loras
    assert first.path == str(tmp_path / "ink.safetensors") and first.scale == 0.8
    assert second.path == "someone/ink-style" and second.scale == 1.0  # a hub id stays one
    with pytest.raises(StoryError, match="weight"):
        story_with(tmp_path, [{"path": "ink.safetensors", "weight": 0.8}])  # unknown key
    with pytest.raises(StoryError, match="scale"):
        story_with(tmp_path, [{"path": "ink.safetensors", "scale": 9}])
    with pytest.raises(StoryError, match=r"LoRA file or folder not found: .*gone.safetensors"):
        story_with(tmp_path, [{"path": "gone.safetensors"}])


def test_a_lora_s_scale_and_bytes_are_in_every_panel_s_key_and_scale_0_is_none(tmp_path):
    from anystory_cli.plan import build_plan

    (tmp_path / "ink.safetensors").write_bytes(b"x")

    def keys(loras, lora_keys=None, runtime=None):
        story = story_with(tmp_path, loras)
        return [p.content_key for p in build_plan(story, lora_keys=lora_keys, runtime=runtime)]

    none = keys([])
    ink = {"path": "ink.safetensors", "scale": 0.8}
    assert keys([ink], ["aaa"]) != none
    assert keys([ink], ["aaa"]) != keys([{**ink, "scale": 0.9}], ["aaa"])
    assert keys([ink], ["aaa"]) != keys([ink], ["bbb"])  # the file's content changed
    assert keys([{**ink, "scale": 0.0}], ["aaa"]) == none
    assert keys([], runtime={"device": "cpu", "dtype": "float32"}) == none
    assert keys([], runtime={"device": "cuda", "dtype": "bfloat16"}) != none
    assert keys([], runtime={"device": "cpu", "dtype": "bfloat16"}) != none


# ---------------------------------------------------------------------------------------------
# a story drawn with a style LoRA


@pytest.fixture
def render_setup(tmp_path, tiny_story_pipeline):
    import storykit

    pipe = tiny_story_pipeline
    lora = make_lora(pipe.base, tmp_path / "loras", name="ink.safetensors")
    panels = [{"prompt": "a hill"}, {"prompt": "mira on a hill", "characters": ["mira"]}]

    def render(out, loras, **options):
        from anystory_cli.render import render_story

        story = storykit.write_story(tmp_path / "story", panels, style={**storykit.STYLE, "loras": loras})
        return render_story(story, out, pipeline_factory=storykit.TinyFactory(pipe),
                            model_fingerprint=storykit.tiny_fingerprint, cache_dir=tmp_path / "cache", **options)

    return pipe, lora, render


def panel_pixels(out):
    from PIL import Image

    return [np.asarray(Image.open(out / "panels" / f"panel-{i:03d}.png")) for i in (1, 2)]


def test_a_story_with_a_style_lora_draws_with_it_then_removes_it(tmp_path, render_setup):
    import storykit

    pipe, lora, render = render_setup
    plain = tmp_path / "plain"
    render(plain, [])
    state = {k: v.clone() for k, v in pipe.base.unet.state_dict().items()}
    styled = tmp_path / "styled"
    summary = render(styled, [{"path": str(lora), "scale": 0.8}])
    assert summary.loras == [{"path": str(lora), "scale": 0.8, "sha256": lora_fingerprint(lora)}]
    for a, b in zip(panel_pixels(plain), panel_pixels(styled)):
        assert not np.array_equal(a, b)
    # gone after the render: the pipeline is exactly what it was
    assert not any(pipe.base.get_list_adapters().values())
    after = pipe.base.unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    # scale 0 is no LoRA: the same panels, not even redrawn
    zero = render(plain, [{"path": str(lora), "scale": 0.0}])
    assert zero.panels_rendered == [] and zero.loras == []
    # the same story again draws nothing; a new scale or new bytes redraw every panel
    assert render(styled, [{"path": str(lora), "scale": 0.8}]).panels_rendered == []
    before = storykit.snapshot(styled)
    assert render(styled, [{"path": str(lora), "scale": 0.5}]).panels_rendered == [1, 2]
    assert storykit.snapshot(styled) != before
    make_lora(pipe.base, lora.parent, name="ink.safetensors", seed=2)
    assert render(styled, [{"path": str(lora), "scale": 0.5}]).panels_rendered == [1, 2]


def test_a_lora_for_another_base_stops_the_render_in_one_line(tmp_path, render_setup):
    pipe, _, render = render_setup
    xl = make_lora(tiny.tiny_sdxl_pipeline(), tmp_path / "xl", name="xl_ink.safetensors")
    with pytest.raises(ModelError, match=r"style.loras: LoRA .*xl_ink.safetensors does not fit") as caught:
        render(tmp_path / "out", [{"path": str(xl)}])
    assert "\n" not in str(caught.value)
    assert not any(pipe.base.get_list_adapters().values())
    with pytest.raises(InputError, match=r"style.loras\[0\]: LoRA .* not in the Hugging Face cache"):
        render(tmp_path / "out", [{"path": "nobody/no-such-lora"}])

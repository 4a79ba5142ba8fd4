"""The default model's base components: tokenizer, assembled pipeline, recipes, resumable training."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from anystory_cli.errors import InputError
from anystory_cli import default_model as bm
from anystory_cli.model_loading import load_panel_lora, unknown_words
from anystory_cli.lab.world import vocabulary
from anystory_cli.lab.train_base import load_recipe, parse_recipe, train

TINY_VAE = {"block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4, "sample_size": 64}
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "projection_dim": 16}
TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "projection_dim": 16, "patch_size": 16}
TINY_UNET = {"block_out_channels": [16, 32], "attention_head_dim": 8, "cross_attention_levels": [False, True],
             "norm_num_groups": 8}
COMMON = {"lr": 1e-3, "warmup_steps": 0, "batch_size": 2, "assets_dir": "assets", "state_dir": "state",
          "cache_dir": "cache"}
TINY_RECIPES = {
    "vae": {"model": "vae", "steps": 2, "scale_batch": 4, "vae": TINY_VAE, **COMMON},
    "clip": {"model": "clip", "steps": 2, "text_steps": 1, "identity_batch": 2, "scene_pool": 4, "text": TINY_TEXT,
             "vision": TINY_VISION, **COMMON},
    "unet": {"model": "unet", "steps": 2, "pool_size": 4, "sample_steps": 1,
             "sample_prompts": ["one character on grass during the day , it is standing in the center"],
             "unet": TINY_UNET, **COMMON},
}


# ---------------------------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return bm.build_tokenizer(vocabulary())


def test_every_world_word_is_one_token_and_round_trips(tokenizer):
    vocab = tokenizer.get_vocab()
    for word in vocabulary():
        assert tokenizer(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]]
    text = " ".join(vocabulary())
    ids = tokenizer(text).input_ids
    assert len(ids) == len(vocabulary()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # CLIPTextModel pools at the end-of-text token: it must be the largest id.
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == max(vocab.values())


def test_captions_tokenize_word_by_word(tokenizer):
    caption = "Two characters on a hill, the left one is jumping"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption, add_special_tokens=False).input_ids)
    assert tokens == [w + "</w>" for w in "two characters on a hill , the left one is jumping".split()]


def test_unknown_words_are_reported_not_dropped(tokenizer):
    assert unknown_words(tokenizer, "two zebras on a hill, 3 times!") == ["zebras", "3", "times", "!"]
    assert unknown_words(tokenizer, "one character in the snow at night") == []
    with pytest.raises(InputError, match="'zebras'"):
        bm.check_prompt(tokenizer, "two zebras on a hill", where="panels[0].prompt")


# ---------------------------------------------------------------------------------------------
# the assembled StableDiffusionPipeline


def _tiny_components(tokenizer):
    torch.manual_seed(0)
    vae_config = bm.VaeConfig(**{**TINY_VAE, "block_out_channels": (8, 16)})
    text_config = bm.TextConfig(**TINY_TEXT)
    unet_config = bm.UNetConfig.from_dict(TINY_UNET)
    return dict(
        vae=bm.build_vae(vae_config), text_encoder=bm.build_text_encoder(text_config, tokenizer),
        tokenizer=tokenizer, unet=bm.build_unet(unet_config, vae_config, text_config),
    ), (vae_config, text_config, unet_config)


def test_standard_stable_diffusion_pipeline_runs_offline(tokenizer):
    from diffusers import StableDiffusionPipeline

    parts, _ = _tiny_components(tokenizer)
    pipe = bm.assemble_pipeline(**parts)
    assert type(pipe) is StableDiffusionPipeline and pipe.vae_scale_factor == 2
    out = pipe("two characters on a hill at night", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_assets_round_trip_to_the_same_pipeline(tokenizer, tmp_path):
    parts, (vae_config, text_config, unet_config) = _tiny_components(tokenizer)
    image_config = bm.VisionConfig(**TINY_VISION)
    image_encoder = bm.build_image_encoder(image_config)
    for name, module, config in [("vae", parts["vae"], vae_config), ("text_encoder", parts["text_encoder"], text_config),
                                 ("unet", parts["unet"], unet_config), ("image_encoder", image_encoder, image_config)]:
        bm.save_asset(name, module, config, tmp_path, dtype=torch.float32)
    bm.write_vocab(vocabulary(), tmp_path)
    pipe, loaded_encoder = bm.load_default_base(tmp_path)
    kwargs = dict(prompt="one character on grass", num_inference_steps=2, output_type="np")
    expected = bm.assemble_pipeline(**parts)(generator=torch.Generator().manual_seed(1), **kwargs).images
    got = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-5)
    pixels = torch.zeros(1, 3, 64, 64)
    torch.testing.assert_close(loaded_encoder(pixels).last_hidden_state, image_encoder.eval()(pixels).last_hidden_state)


def test_missing_assets_say_how_to_make_them(tmp_path):
    from anystory_cli.errors import ModelError

    with pytest.raises(ModelError, match=r"vae: missing.*anystory train recipes/base_vae\.yaml"):
        bm.load_default_base(tmp_path)


# ---------------------------------------------------------------------------------------------
# recipes


def test_recipe_errors_name_the_field():
    with pytest.raises(InputError, match=r"recipe\.yaml: learning_rate: unknown key"):
        parse_recipe({**TINY_RECIPES["vae"], "learning_rate": 1e-3}, "recipe.yaml")
    with pytest.raises(InputError, match=r"lr: Input should be greater than 0"):
        parse_recipe({**TINY_RECIPES["vae"], "lr": -1e-3}, "recipe.yaml")
    with pytest.raises(InputError, match=r"vae: .*unknown key\(s\) \['channels'\]"):
        parse_recipe({**TINY_RECIPES["vae"], "vae": {"channels": 3}}, "recipe.yaml")
    with pytest.raises(InputError, match=r"text_steps \(5\) must not exceed steps \(2\)"):
        parse_recipe({**TINY_RECIPES["clip"], "text_steps": 5}, "recipe.yaml")
    with pytest.raises(InputError, match=r"recipe\.yaml: model: .*'gan'"):
        parse_recipe({**TINY_RECIPES["vae"], "model": "gan"}, "recipe.yaml")
    with pytest.raises(InputError, match="model: vae | clip | unet"):
        parse_recipe({"steps": 3}, "recipe.yaml")


def test_shipped_recipes_are_valid():
    from pathlib import Path

    for name in ("vae", "clip", "unet", "unet_shapes", "unet_panels"):
        recipe, _ = load_recipe(Path(__file__).parent.parent / "recipes" / f"base_{name}.yaml")
        assert recipe.model == name.split("_")[0] and recipe.max_hours <= 3


def _write_recipe(folder, name, **changes):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY_RECIPES[name], **changes}))
    return load_recipe(path)


def _checkpoint(folder, name):
    run = folder / "state" / f"{name}.state"
    return run / (run / "latest").read_text().strip()


def _state(folder, name):
    """The run's newest checkpoint: its weights and its AdamW state, tensors by name."""
    checkpoint = _checkpoint(folder, name)
    tensors = load_file(str(checkpoint / "weights.safetensors"))
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    tensors.update({f"optim/{index}/{key}": value
                    for index, entry in optimizer["state"].items() for key, value in entry.items()})
    return tensors


def _state_files(folder, name):
    run = folder / "state" / f"{name}.state"
    return {path.relative_to(run): path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def trained_inputs(tmp_path_factory):
    """Final tiny VAE and text encoder: what the UNet recipe trains on."""
    folder = tmp_path_factory.mktemp("inputs")
    for name in ("vae", "clip"):
        recipe, base = _write_recipe(folder, name)
        train(recipe, base, log=lambda record: None)
    return folder / "assets"


@pytest.mark.parametrize("name", ["vae", "clip", "unet"])
def test_interrupted_run_resumes_to_the_same_weights(name, tmp_path, trained_inputs):
    states = []
    for run, first_call_steps in (("whole", None), ("resumed", 1)):
        folder = tmp_path / run
        folder.mkdir()
        if name == "unet":
            shutil.copytree(trained_inputs, folder / "assets")
        recipe, base = _write_recipe(folder, name)
        if first_call_steps:
            record = train(recipe, base, max_steps=first_call_steps, log=lambda record: None)
            assert record["step"] == 1 and not record["final"]
        record = train(recipe, base, log=lambda record: None)
        assert record["step"] == 2 and record["final"]
        states.append(_state(folder, name))
        # one checkpoint per run: the newest; the one of the first call is gone
        assert sorted(p.name for p in (folder / "state" / f"{name}.state").iterdir()) == ["latest", "step-0000002"]
    whole, resumed = states
    assert whole.keys() == resumed.keys() and any(key.startswith("optim/") for key in whole)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_a_single_file_state_resumes_to_the_same_weights(tmp_path):
    """A run whose state is one safetensors file (`<run>.state.safetensors`: `{module}/{parameter}`
    weights, `optim/{index}/{key}` AdamW state, `rng/torch`; step, elapsed time and param_groups in
    the metadata) resumes from it to the weights of an uninterrupted run."""
    import json

    from safetensors.torch import save_file

    states = []
    for run, cut in (("whole", False), ("resumed", True)):
        folder = tmp_path / run
        folder.mkdir()
        recipe, base = _write_recipe(folder, "vae")
        if cut:
            train(recipe, base, max_steps=1, log=lambda record: None)
            checkpoint = _checkpoint(folder, "vae")
            optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
            tensors = {**load_file(str(checkpoint / "weights.safetensors")),
                       **{f"optim/{index}/{key}": value
                          for index, entry in optimizer["state"].items() for key, value in entry.items()},
                       "rng/torch": torch.get_rng_state()}
            metadata = {"format": "anystory-base-state/1", "step": "1", "elapsed": "1.5",
                        "param_groups": json.dumps(optimizer["param_groups"]), "recipe": recipe.model_dump_json()}
            save_file(tensors, str(folder / "state" / "vae.state.safetensors"), metadata=metadata)
            shutil.rmtree(folder / "state" / "vae.state")
        record = train(recipe, base, log=lambda record: None)
        assert record["step"] == 2 and record["final"]
        states.append(_state(folder, "vae"))
    whole, resumed = states
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_the_learning_rate_is_transformers_cosine_with_min_lr_and_resumes_with_the_run(tmp_path):
    """Each step's learning rate is transformers' cosine_with_min_lr with warm-up (lr * s / warmup
    below warmup_steps, then a cosine to lr * min_lr_ratio at `steps`). The schedule is saved in
    the checkpoint (scheduler.bin); a checkpoint without it resumes by stepping a fresh schedule to
    its step. Both resumed runs log the same rates and end with the weights of an uninterrupted run."""
    import json

    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    lr, steps, warmup, floor = 1e-3, 5, 2, 0.2
    library = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr), num_warmup_steps=warmup,
        num_training_steps=steps, min_lr_rate=floor)
    expected = []
    for _ in range(steps):
        expected.append(library.get_last_lr()[0])
        library.optimizer.step()
        library.step()
    assert expected[:3] == [0.0, lr / 2, lr]  # the warm-up, then the cosine's start
    assert expected[3] == pytest.approx(lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi / 3))))

    runs = {}
    for run in ("whole", "resumed", "resumed without the schedule"):
        folder = tmp_path / run.replace(" ", "_")
        folder.mkdir()
        recipe, base = _write_recipe(folder, "vae", steps=steps, warmup_steps=warmup, min_lr_ratio=floor,
                                     log_every=1)
        records = []
        if run != "whole":
            train(recipe, base, max_steps=2, log=records.append)
            checkpoint = _checkpoint(folder, "vae")
            assert (checkpoint / "scheduler.bin").is_file()
            if run == "resumed without the schedule":
                (checkpoint / "scheduler.bin").unlink()
                info = json.loads((checkpoint / "run_state.json").read_text())
                del info["files"]["scheduler.bin"]
                (checkpoint / "run_state.json").write_text(json.dumps(info))
        train(recipe, base, log=records.append)
        logged = {record["step"]: record["lr"] for record in records if "lr" in record}
        assert logged == {step + 1: round(value, 7) for step, value in enumerate(expected)}, run
        schedule = torch.load(_checkpoint(folder, "vae") / "scheduler.bin", weights_only=True)
        assert schedule["last_epoch"] == steps
        assert schedule["_last_lr"][0] == pytest.approx(lr * floor, rel=1e-12)  # the end: lr * min_lr_ratio
        runs[run] = _state(folder, "vae")
    whole = runs.pop("whole")
    for run, state in runs.items():
        assert state.keys() == whole.keys()
        for key in whole:
            assert torch.equal(whole[key], state[key]), (run, key)


def test_a_damaged_or_foreign_checkpoint_stops_the_run_with_one_line(tmp_path):
    from anystory_cli.errors import ModelError

    recipe, base = _write_recipe(tmp_path, "vae", steps=1)
    train(recipe, base, log=lambda record: None)
    weights = _checkpoint(tmp_path, "vae") / "weights.safetensors"
    good = weights.read_bytes()
    more, _ = _write_recipe(tmp_path, "vae", steps=2)
    for damage, message in (
        (lambda: weights.write_bytes(good[:100]), r"weights\.safetensors: the checkpoint is damaged"),
        (lambda: weights.write_bytes(b"\xff" * len(good)), r"step-0000001: the checkpoint does not load"),
    ):
        damage()
        with pytest.raises(ModelError, match=message) as caught:
            train(more, base, log=lambda record: None)
        assert "\n" not in str(caught.value) and "to start the run over" in str(caught.value)
    weights.write_bytes(good)
    wider, _ = _write_recipe(tmp_path, "vae", steps=2, vae={**TINY_VAE, "block_out_channels": [8, 32]})
    with pytest.raises(ModelError, match=r"does not match this recipe's model .*delete .*vae\.state to start"):
        train(wider, base, log=lambda record: None)
    assert weights.read_bytes() == good


def test_finished_run_publishes_loadable_assets(trained_inputs):
    import json

    assert json.loads((trained_inputs / "training_status.json").read_text())["vae"] == {"step": 2, "final": True}
    assert json.loads((trained_inputs / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    vae = bm.load_vae(trained_inputs)
    assert vae.config.scaling_factor > 0 and vae.config.scaling_factor != 1.0
    tokenizer = bm.load_tokenizer(trained_inputs)
    assert bm.load_text_encoder(tokenizer, trained_inputs).config.eos_token_id == len(tokenizer) - 1
    assert bm.load_image_encoder(trained_inputs).config.image_size == 64


def test_a_continuation_recipe_starts_from_the_published_unet_and_trains_other_shapes(tmp_path, trained_inputs):
    from anystory_cli.lab.train_base import RunPaths, UNetTask

    shutil.copytree(trained_inputs, tmp_path / "assets")
    first, base = _write_recipe(tmp_path, "unet")
    train(first, base, log=lambda record: None)
    published = bm.load_unet(tmp_path / "assets").state_dict()
    first_state = _state_files(tmp_path, "unet")
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump({**TINY_RECIPES["unet"], "run_name": "unet_shapes", "init_from_published": True,
                                    "sizes": [[64, 64], [64, 96]], "size_weights": [0.0, 1.0], "size_pool": 3,
                                    "steps": 2, "seed": 5}))
    recipe, base = load_recipe(path)
    task = UNetTask(recipe, RunPaths(recipe, base))
    assert all(torch.equal(v.half(), published[k]) for k, v in task.unet.state_dict().items())
    (square, _), (wide, wide_ids) = task.pools
    assert square.shape[-2:] == (32, 32) and wide.shape == (3, 4, 32, 48) and len(wide_ids) == 3
    record = train(recipe, base, max_steps=1, log=lambda record: None)
    assert record["step"] == 1 and not record["final"]  # it published its own unfinished UNet
    record = train(recipe, base, log=lambda record: None)  # and resumes from its own state
    assert record["step"] == 2 and record["final"]
    assert _checkpoint(tmp_path, "unet_shapes").name == "step-0000002"
    assert _state_files(tmp_path, "unet") == first_state  # not resumed, not touched
    after = bm.load_unet(tmp_path / "assets").state_dict()
    assert any(not torch.equal(after[k], published[k]) for k in after)  # the continuation published its UNet


def test_a_panel_lora_trains_over_the_frozen_unet_and_draws_only_non_square_panels(tmp_path, trained_inputs):
    """The panel LoRA recipe leaves the published UNet untouched, resumes exactly, and the
    loaded LoRA changes a wide forward while a square one stays bit-identical to the UNet's."""
    shutil.copytree(trained_inputs, tmp_path / "assets")
    first, base = _write_recipe(tmp_path, "unet")
    train(first, base, log=lambda record: None)
    unet_bytes = (tmp_path / "assets" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    states = []
    for run, first_call_steps in (("whole", None), ("resumed", 1)):
        folder = tmp_path / run
        shutil.copytree(tmp_path / "assets", folder / "assets")
        path = folder / "panels.yaml"
        path.write_text(yaml.safe_dump({**TINY_RECIPES["unet"], "run_name": "unet_panels", "init_from_published": True,
                                        "panel_lora_rank": 2, "sizes": [[64, 96], [96, 64]], "size_pool": 3,
                                        "steps": 2, "lr": 1e-2}))
        recipe, recipe_base = load_recipe(path)
        if first_call_steps:
            assert not train(recipe, recipe_base, max_steps=first_call_steps, log=lambda record: None)["final"]
        assert train(recipe, recipe_base, log=lambda record: None)["final"]
        assert (folder / "assets" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_bytes  # not retrained
        states.append(_state(folder, "unet_panels"))
    whole, resumed = states
    assert whole.keys() == resumed.keys() and any("lora" in key for key in whole)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key

    assets = tmp_path / "whole" / "assets"
    plain = bm.load_unet(assets)
    with_lora = bm.load_unet(assets)
    assert load_panel_lora(with_lora, assets) and not load_panel_lora(bm.load_unet(tmp_path / "assets"), tmp_path / "assets")
    context = torch.randn(1, bm.MAX_PROMPT_TOKENS, TINY_TEXT["hidden_size"])
    with torch.no_grad():
        for size, same in (((32, 32), True), ((32, 48), False), ((48, 32), False), ((32, 32), True)):
            latents = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(0))
            drawn = with_lora(latents, 500, context).sample
            assert torch.equal(drawn, plain(latents, 500, context).sample) == same, size


@pytest.mark.parametrize("change, message", [
    ({"panel_lora_rank": 4, "run_name": "unet_panels"}, "needs init_from_published"),
    ({"init_from_published": True}, "run_name of its own"),
    ({"sizes": [[64, 64]], "size_weights": [1.0, 2.0]}, "one weight per entry"),
    ({"sizes": [[64, 0]]}, "both positive"),
    ({"run_name": "../elsewhere"}, "run_name"),
])
def test_unet_continuation_fields_are_checked(change, message):
    with pytest.raises(InputError, match=message):
        parse_recipe({**TINY_RECIPES["unet"], **change})


def test_unet_recipe_refuses_unfinished_inputs(tmp_path):
    from anystory_cli.errors import ModelError

    recipe, base = _write_recipe(tmp_path, "unet")
    with pytest.raises(ModelError, match="not final"):
        train(recipe, base, log=lambda record: None)


def test_sampling_and_training_schedulers_agree():
    train_scheduler, sample_scheduler = bm.build_training_scheduler(), bm.build_scheduler()
    torch.testing.assert_close(train_scheduler.alphas_cumprod, sample_scheduler.alphas_cumprod)
    assert train_scheduler.config.prediction_type == sample_scheduler.config.prediction_type == "v_prediction"


def _hold_run_lock(path, connection) -> None:
    from anystory_cli.lab.train_base import run_lock

    with run_lock(path):
        connection.send("held")
        connection.recv()  # until killed


def test_a_second_process_on_the_same_recipe_is_refused(tmp_path):
    """Refused at once while another process trains the recipe; taken over when that process
    has died without cleaning up."""
    import multiprocessing

    recipe, base = _write_recipe(tmp_path, "vae", steps=1)
    state = tmp_path / "state"
    state.mkdir()
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    ours, theirs = context.Pipe()
    holder = context.Process(target=_hold_run_lock, args=(state / "vae.lock", theirs))
    holder.start()
    try:
        assert ours.poll(60) and ours.recv() == "held"
        with pytest.raises(InputError, match=f"vae.lock: process {holder.pid} is already training this recipe"):
            train(recipe, base, log=lambda record: None)
    finally:
        holder.kill()  # no release, no clean-up: as a crash
        holder.join()
    assert train(recipe, base, log=lambda record: None)["final"]


def test_the_run_lock_lets_one_holder_in_and_refuses_the_rest_at_once(tmp_path):
    import threading
    import time

    from anystory_cli.lab.train_base import run_lock

    path = tmp_path / "run.lock"
    inside, release, outcomes = threading.Event(), threading.Event(), []

    def hold():
        with run_lock(path):
            inside.set()
            release.wait(10)

    first = threading.Thread(target=hold)
    first.start()
    assert inside.wait(10)

    def contend():
        started = time.monotonic()
        try:
            with run_lock(path):
                outcomes.append("acquired")
        except InputError as exc:
            outcomes.append((str(exc), time.monotonic() - started))

    others = [threading.Thread(target=contend) for _ in range(3)]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join(10)
    release.set()
    first.join(10)
    assert [o[0] for o in outcomes] == [f"{path}: process {os.getpid()} is already training this recipe"] * 3
    assert max(o[1] for o in outcomes) < 2.0  # refused, not kept waiting
    with run_lock(path):  # free again once released
        assert path.read_text() == str(os.getpid())


def test_anystory_pipeline_wraps_the_base_model(tokenizer):
    """The adapter path on the default model's shapes: 8 latent channels, 64x64 references,
    a CLIPVisionModel of width 16, no attention at the UNet's finest level."""
    from PIL import Image

    from anystory_cli.sd.adapter import AnyStoryAdapter
    from anystory_cli.sd.pipeline import AnyStoryPipeline
    from anystory_cli.lab.world import reference_image, train_identity_seeds

    parts, _ = _tiny_components(tokenizer)
    parts["vae"] = bm.build_vae(bm.VaeConfig(block_out_channels=(8, 16, 16), latent_channels=8, norm_num_groups=4))
    parts["unet"] = bm.build_unet(bm.UNetConfig.from_dict(TINY_UNET), bm.VaeConfig(block_out_channels=(8, 16, 16)),
                                  bm.TextConfig(**TINY_TEXT))
    base = bm.assemble_pipeline(**parts)
    image_encoder = bm.build_image_encoder(bm.VisionConfig(**TINY_VISION))
    adapter = AnyStoryAdapter.from_unet(base.unet, 16, image_size=64, reference_size=64, num_subject_tokens=4,
                                        qformer_hidden_dim=16, qformer_heads=2, routing_dim=16, router_hidden_dim=8)
    pipe = AnyStoryPipeline.from_pipe(base, image_encoder, adapter)
    reference = Image.fromarray(reference_image(train_identity_seeds(1)[0]), "RGBA")
    character = pipe.encode_character(reference, name="mira")
    out = pipe("one character on grass", characters=[character], num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np", return_routing=True)
    assert out.images.shape == (1, 64, 64, 3) and out.routing_maps.shape == (1, 2, 64, 64)


def test_anystory_draws_squares_without_the_panel_lora_and_other_shapes_with_it(tokenizer, tmp_path):
    """AnyStory's attention processors on a UNet whose adapted layers the panel LoRA swaps: a
    square panel is the plain UNet's, a wide one is not."""
    from PIL import Image

    from anystory_cli.sd.adapter import AnyStoryAdapter
    from anystory_cli.sd.pipeline import AnyStoryPipeline
    from anystory_cli.lab.world import reference_image, train_identity_seeds

    parts, (vae_config, text_config, unet_config) = _tiny_components(tokenizer)
    adapter = AnyStoryAdapter.from_unet(parts["unet"], 16, image_size=64, reference_size=64, num_subject_tokens=4,
                                        qformer_hidden_dim=16, qformer_heads=2, routing_dim=16, router_hidden_dim=8)
    trained = bm.build_unet(unet_config, vae_config, text_config)
    trained.load_state_dict(parts["unet"].state_dict())
    bm.add_panel_lora(trained, 2)
    with torch.no_grad():
        for name, weight in trained.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.1)  # as trained: B is no longer zero
    bm.save_panel_lora(trained, 2, tmp_path)
    plain_unet = bm.build_unet(unet_config, vae_config, text_config)
    plain_unet.load_state_dict(parts["unet"].state_dict())
    assert load_panel_lora(parts["unet"], tmp_path)
    image_encoder = bm.build_image_encoder(bm.VisionConfig(**TINY_VISION))
    reference = Image.fromarray(reference_image(train_identity_seeds(1)[0]), "RGBA")

    def draw(unet, height, width):
        pipe = AnyStoryPipeline.from_pipe(bm.assemble_pipeline(**{**parts, "unet": unet}), image_encoder, adapter)
        character = pipe.encode_character(reference, name="mira")
        return pipe("one character on grass", characters=[character], num_inference_steps=2, height=height,
                    width=width, generator=torch.Generator().manual_seed(0), output_type="np").images

    assert np.array_equal(draw(parts["unet"], 64, 64), draw(plain_unet, 64, 64))
    assert not np.array_equal(draw(parts["unet"], 64, 96), draw(plain_unet, 64, 96))


@pytest.mark.parametrize("name", ["unet/diffusion_pytorch_model.safetensors", "anystory_panel_lora.safetensors"])
def test_a_damaged_weights_file_is_named_in_one_error(name, tmp_path):
    from anystory_cli.errors import ModelError

    shutil.copytree(bm.DEFAULT_ASSETS, tmp_path / "assets")
    path = tmp_path / "assets" / name
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load") as error:
        bm.load_default_base(tmp_path / "assets")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_shipped_base_assets_load_offline():
    """Whatever has been trained so far must load; skipped until every base model exists."""
    folder = bm.DEFAULT_ASSETS
    assert all((folder / name / "config.json").is_file() for name in bm.PARTS)
    pipe, image_encoder = bm.load_default_base()
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels
    assert image_encoder.config.image_size == 64


def test_scene_pools_of_tall_shapes_fall_back_to_fewer_characters_and_squares_are_unchanged():
    from anystory_cli.lab.world import sample_scene
    from anystory_cli.lab.world.rng import WorldRng
    from anystory_cli.lab.train_base import scene_batch

    # four side by side almost never fit here, three only half the time: no error, other draws
    tall = scene_batch(WorldRng("test", 1), 24, (128, 64))
    assert all(s.image.shape == (128, 64, 3) and 1 <= len(s.masks) <= 4 for s in tall)
    rng, again = WorldRng("test", 2), WorldRng("test", 2)
    squares = scene_batch(rng, 6, 32)
    expected = [sample_scene(again.integer(1 << 40), 1 + again.integer(4), "train", 32)
                for _ in range(6)]  # the draws the pools always made: shared pools stay valid
    for scene, wanted in zip(squares, expected):
        assert np.array_equal(scene.image, wanted.image) and scene.caption == wanted.caption


@pytest.mark.parametrize("size", [32, (64, 32)])
def test_scene_pools_rendered_by_several_processes_are_the_pools_one_process_renders(tmp_path, size):
    from anystory_cli.lab.world import sample_scene
    from anystory_cli.lab.world.rng import WorldRng
    from anystory_cli.lab.train_base import scene_pool

    one, captions = scene_pool(tmp_path / "one", 12, size, seed=3)
    many, many_captions = scene_pool(tmp_path / "many", 12, size, seed=3, workers=2)
    assert torch.equal(one, many) and captions == many_captions
    cached, _ = scene_pool(tmp_path / "many", 12, size, seed=3)  # read back from the cache file
    assert torch.equal(cached, one)
    if size == 32:  # squares never retry: the draws the shipped model's pools were made of
        rng = WorldRng("scene-pool", 3)
        draws = [(rng.integer(1 << 40), 1 + rng.integer(4)) for _ in range(12)]
        assert all(np.array_equal(one[i].numpy(), sample_scene(s, n, "train", 32).image)
                   for i, (s, n) in enumerate(draws))

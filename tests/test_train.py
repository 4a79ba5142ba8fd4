"""Training on tiny SD-1.5- and SDXL-shaped components, data from the sprite world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from anystory_cli.errors import InputError
from anystory_cli.train import Components, load_recipe, recipe_from_dict, train, validate_manifest
from anystory_cli.lab.world import sample_pair, sample_scene

torch.set_num_threads(1)

PIPELINES = {"sd": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline}


def _save(folder, name, array):
    Image.fromarray(array).save(folder / name)
    return name


def write_stage1(folder, count=3):
    rows = []
    for i in range(count):
        pair = sample_pair(i, size=32)
        rows.append({"reference": _save(folder, f"ref{i}.png", pair.reference), "reference_mask": None,
                     "target": _save(folder, f"target{i}.png", pair.target.image), "caption": pair.target.caption})
    return _manifest(folder, rows)


def write_stage2(folder, count=3):
    rows = []
    for i in range(count):
        scene = sample_scene(i, 2, size=32)
        masks = [_save(folder, f"s{i}_m{k}.png", (m * 255).astype(np.uint8)) for k, m in enumerate(scene.masks)]
        rows.append({"image": _save(folder, f"s{i}.png", scene.image), "masks": masks, "caption": scene.caption})
    return _manifest(folder, rows)


def _manifest(folder, rows):
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path, stage, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = (write_stage1 if stage == 1 else write_stage2)(tmp_path)
    fields = dict(stage=stage, data=str(data), output_dir=str(tmp_path / "out"), lr=1e-3, steps=2,
                  batch_size=2, checkpoint_every=1, seed=3, adapter_options=tiny.TINY_ADAPTER_OPTIONS,
                  preview_count=1, preview_steps=2)
    return recipe_from_dict({**fields, **overrides})


def components(kind="sd"):
    return Components(PIPELINES[kind](), tiny.tiny_image_encoder())


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


TRAINED = {1: ("subject_qformer", "reference_net", "subject_kv", "reference_kv"), 2: ("routing_qformer", "routers")}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("stage", [1, 2])
def test_stage_trains_only_its_parameters(tmp_path, kind, stage):
    parts = components(kind)
    frozen = {name: getattr(parts.pipe, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
              if getattr(parts.pipe, name, None) is not None}
    frozen["image_encoder"] = parts.image_encoder
    before = {name: _snapshot(m) for name, m in frozen.items()}
    torch.manual_seed(3)
    initial = tiny.tiny_adapter(parts.pipe.unet, parts.image_encoder, seed=3)
    initial_state = _snapshot(initial)
    result = train(recipe(tmp_path, stage), parts)
    assert result.step == 2 and len(result.losses) == 2
    assert all(np.isfinite(v) for r in result.losses for v in r.values())
    if stage == 2:
        assert "routing" in result.losses[0]
    for name, module in frozen.items():
        assert all(torch.equal(before[name][k], v) for k, v in module.state_dict().items()), name
    after = result.adapter.state_dict()
    for group in ("subject_qformer", "routing_qformer", "reference_net", "routers", "subject_kv", "reference_kv"):
        keys = [k for k in after if k.startswith(group + ".")]
        changed = any(not torch.equal(initial_state[k], after[k]) for k in keys)
        assert changed == (group in TRAINED[stage]), group
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]


def test_overfitting_one_batch_drives_the_routing_loss_down(tmp_path):
    """One fixed batch with fixed noise, timestep and Gumbel draws: the router must be able to fit
    the instance masks. Only the routing term is optimised here: on random tiny components the
    diffusion gradient that reaches the routers through the straight-through Gumbel gates is
    noise that outweighs it (with diffusion + routing the routing loss does not fall)."""
    from diffusers import DDPMScheduler

    from anystory_cli.sd.adapter import install
    from anystory_cli.train.loop import Encoders, SampleStream, freeze, make_adapter, step_loss

    rec = recipe(tmp_path, 2, batch_size=2)
    parts = components()
    adapter = make_adapter(rec, parts)
    params = freeze(parts, adapter, 2)
    handle = install(adapter, parts.pipe.unet)
    encoders = Encoders(parts, adapter, torch.device("cpu"))
    samples = SampleStream(rec, adapter.config.reference_size, 32, 0, 1).batch(0)
    scheduler = DDPMScheduler.from_config(parts.pipe.scheduler.config)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-2)
    routing = []
    for _ in range(60):
        torch.manual_seed(0)
        losses = step_loss(samples, adapter, encoders, scheduler, 2, torch.Generator().manual_seed(1), [False, False])
        losses["routing"].backward()
        optimizer.step()
        optimizer.zero_grad()
        routing.append(losses["routing"].item())
    handle.remove()
    assert min(routing[-5:]) < routing[0] / 2.5, routing


def test_the_recipe_s_routing_loss_weight_is_lambda_of_the_logged_routing_loss(tmp_path):
    """routing_loss_weight scales the routing term and nothing else: the first step's losses come
    from the same weights and draws, so λ = 1 logs exactly ten times λ = 0.1 (the paper's)."""
    paper = train(recipe(tmp_path / "a", 2, steps=1), components()).losses[0]
    tenfold = train(recipe(tmp_path / "b", 2, steps=1, routing_loss_weight=1.0), components()).losses[0]
    assert recipe(tmp_path / "c", 2).routing_loss_weight == 0.1
    assert tenfold["routing"] == pytest.approx(10 * paper["routing"], rel=1e-4)
    assert tenfold["diffusion"] == pytest.approx(paper["diffusion"], rel=1e-5)
    with pytest.raises(InputError, match="routing_loss_weight"):
        recipe(tmp_path / "d", 2, routing_loss_weight=-1)


def test_max_minutes_stops_with_a_checkpoint_that_resumes_exactly(tmp_path):
    """A lent GPU is sized in minutes: the run stops at the first step past max_minutes with a
    checkpoint, and `resume` goes on to the same weights an uninterrupted run reaches."""
    straight = train(recipe(tmp_path / "a", 2, steps=3, checkpoint_every=10), components())
    cut = train(recipe(tmp_path / "b", 2, steps=3, checkpoint_every=10, max_minutes=1e-9), components())
    assert cut.step == 1 and cut.checkpoint is not None and cut.checkpoint.name == "step-0000001"
    resumed = train(recipe(tmp_path / "b", 2, steps=3, checkpoint_every=10, resume=True), components())
    assert resumed.step == 3
    for k, v in straight.adapter.state_dict().items():
        assert torch.equal(v, resumed.adapter.state_dict()[k]), k


def test_the_learning_rate_follows_the_recipe_s_schedule_across_a_resume(tmp_path):
    """`lr_scheduler` / `lr_warmup_steps` are diffusers' get_scheduler: linear warm-up over one
    step, then linear decay to 0 at `steps`; a resumed run continues the schedule where it
    stopped and reaches the same weights."""
    schedule = dict(lr_scheduler="linear", lr_warmup_steps=1, steps=3, checkpoint_every=1)
    straight = train(recipe(tmp_path / "a", 2, **schedule), components())
    train(recipe(tmp_path / "b", 2, **{**schedule, "max_minutes": 1e-9}), components())
    resumed = train(recipe(tmp_path / "b", 2, **schedule, resume=True), components())

    def lr_after(folder, step):
        path = folder / "out" / "checkpoints" / f"step-{step:07d}" / "optimizer.bin"
        return torch.load(path, weights_only=True)["param_groups"][0]["lr"]

    lr = recipe(tmp_path / "c", 2).lr
    assert [lr_after(tmp_path / "a", s) for s in (1, 2, 3)] == pytest.approx([lr, lr / 2, 0.0])
    assert [lr_after(tmp_path / "b", s) for s in (1, 2, 3)] == pytest.approx([lr, lr / 2, 0.0])
    for k, v in straight.adapter.state_dict().items():
        assert torch.equal(v, resumed.adapter.state_dict()[k]), k


def test_resume_continues_exactly(tmp_path):
    straight = train(recipe(tmp_path / "a", 2, steps=4, grad_accumulation=2), components())
    train(recipe(tmp_path / "b", 2, steps=2, grad_accumulation=2), components())
    resumed = train(recipe(tmp_path / "b", 2, steps=4, grad_accumulation=2, resume=True), components())
    assert resumed.step == 4 and len(resumed.losses) == 2
    for k, v in straight.adapter.state_dict().items():
        assert torch.equal(v, resumed.adapter.state_dict()[k]), k
    log = [json.loads(line)["step"] for line in (tmp_path / "b" / "out" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_keep_checkpoints_keeps_the_newest_and_the_run_still_resumes_exactly(tmp_path):
    straight = train(recipe(tmp_path / "a", 2, steps=4), components())
    train(recipe(tmp_path / "b", 2, steps=3, keep_checkpoints=2), components())
    folders = sorted(p.name for p in (tmp_path / "b" / "out" / "checkpoints").iterdir())
    assert folders == ["step-0000002", "step-0000003"]
    resumed = train(recipe(tmp_path / "b", 2, steps=4, keep_checkpoints=2, resume=True), components())
    assert sorted(p.name for p in (tmp_path / "b" / "out" / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
    for k, v in straight.adapter.state_dict().items():
        assert torch.equal(v, resumed.adapter.state_dict()[k]), k


def test_a_single_file_training_state_resumes_exactly(tmp_path):
    """A checkpoint holding the adapter and `training_state.safetensors` (the optimizer state
    flattened into tensors, param_groups and step in its metadata) resumes to the weights of an
    uninterrupted run, the learning-rate schedule included."""
    from safetensors.torch import save_file

    schedule = dict(steps=2, checkpoint_every=10, preview_count=0, lr_scheduler="linear")
    straight = train(recipe(tmp_path / "a", 2, **schedule), components())
    folder = train(recipe(tmp_path / "b", 2, **schedule, max_minutes=1e-9), components()).checkpoint
    state = torch.load(folder / "optimizer.bin", weights_only=True)
    tensors = {f"optimizer/{index}/{key}": value.contiguous()
               for index, entry in state["state"].items() for key, value in entry.items()}
    save_file(tensors, str(folder / "training_state.safetensors"),
              metadata={"step": "1", "seed": "3", "stage": "2", "param_groups": json.dumps(state["param_groups"])})
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "run_state.json"):
        (folder / name).unlink()
    resumed = train(recipe(tmp_path / "b", 2, **schedule, resume=True), components())
    assert resumed.step == 2
    for k, v in straight.adapter.state_dict().items():
        assert torch.equal(v, resumed.adapter.state_dict()[k]), k


def test_a_damaged_checkpoint_stops_the_resume_with_one_line(tmp_path):
    """A checkpoint is what Accelerator.save_state writes, the adapter in its published format and
    run_state.json; a truncated, unreadable or missing part, a checkpoint of the other stage or a
    `latest` naming no folder is one ModelError line that says how to start over, and the
    checkpoint is left as it was."""
    from anystory_cli.errors import ModelError
    from anystory_cli.sd.weights import load_adapter

    rec = recipe(tmp_path, 2, steps=1, preview_count=0)
    folder = train(rec, components()).checkpoint
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter.safetensors", "optimizer.bin", "random_states_0.pkl", "run_state.json", "scheduler.bin"]
    assert load_adapter(folder / "adapter.safetensors").config.max_characters == 4
    more = rec.model_copy(update={"steps": 2, "resume": True})
    optimizer = folder / "optimizer.bin"
    good = optimizer.read_bytes()

    def refused(pattern):
        with pytest.raises(ModelError, match=pattern) as caught:
            train(more, components())
        assert "\n" not in str(caught.value) and "--restart" in str(caught.value), caught.value

    optimizer.write_bytes(good[: len(good) // 2])
    refused(r"optimizer\.bin: the checkpoint is damaged \(optimizer\.bin has \d+ bytes, \d+ were written\)")
    optimizer.write_bytes(b"\0" * len(good))
    refused(r"step-0000001: the checkpoint does not load \(")
    optimizer.write_bytes(good)
    info = json.loads((folder / "run_state.json").read_text())
    (folder / "run_state.json").write_text(json.dumps({**info, "stage": 1}))
    refused("a stage-1 checkpoint, and the recipe trains stage 2")
    (folder / "run_state.json").unlink()
    refused(r"step-0000001: not a training checkpoint \(run_state\.json is missing\)")
    (tmp_path / "out" / "latest").write_text("step-0000009\n")
    refused(r"latest names the checkpoint .*step-0000009, which is not there")
    assert optimizer.read_bytes() == good


def test_checkpoint_loads_into_the_pipeline_and_renders(tmp_path):
    from anystory_cli.sd.pipeline import AnyStoryPipeline

    parts = components()
    result = train(recipe(tmp_path, 1, steps=1), parts)
    checkpoint = result.checkpoint / "adapter.safetensors"
    assert checkpoint.is_file() and (tmp_path / "out" / "adapter.safetensors").is_file()
    pipe = AnyStoryPipeline.from_pipe(tiny.tiny_sd_pipeline(), parts.image_encoder, checkpoint)
    character = pipe.encode_character(tiny.sprite(size=32))
    out = pipe("a cat", [character], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert np.isfinite(out.images).all()


@pytest.mark.parametrize("change, expected", [
    ({"lr": -1}, "lr"), ({"stage": 3}, "stage"), ({"data": "nowhere.jsonl"}, "not found"),
    ({"learning_rate": 1}, "learning_rate"), ({"on_corrupt": "maybe"}, "on_corrupt"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_recipe_values_are_clear_errors(tmp_path, change, expected):
    data = write_stage1(tmp_path, 1)
    fields = dict(stage=1, data=str(data), output_dir=str(tmp_path / "out"), steps=1)
    with pytest.raises(InputError, match=expected):
        recipe_from_dict({**fields, **change})


def test_yaml_recipe_paths_are_relative_to_the_recipe(tmp_path):
    write_stage1(tmp_path, 1)
    (tmp_path / "r.yaml").write_text("stage: 1\ndata: train.jsonl\noutput_dir: out\nsteps: 1\n")
    assert load_recipe(tmp_path / "r.yaml").data == tmp_path / "train.jsonl"
    (tmp_path / "bad.yaml").write_text("stage: 1\ndata: train.jsonl\noutput_dir: out\nsteps: 1\nbogus: 2\n")
    with pytest.raises(InputError, match="bogus"):
        load_recipe(tmp_path / "bad.yaml")


def test_empty_dataset_is_refused(tmp_path):
    rec = recipe(tmp_path, 1)
    rec.data.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        train(rec, components())


def test_manifest_validator_reports_bad_rows_by_line(tmp_path):
    path = write_stage2(tmp_path, 2)
    rows = path.read_text().splitlines()
    good = json.loads(rows[0])
    _save(tmp_path, "blank.png", np.zeros((32, 32), np.uint8))
    _save(tmp_path, "small.png", np.full((16, 16), 255, np.uint8))
    bad = [
        {**good, "image": "missing.png"},
        {**good, "masks": ["small.png"]},
        {**good, "masks": ["blank.png"]},
    ]
    path.write_text("\n".join(rows + [json.dumps(r) for r in bad] + ["{not json"]) + "\n")
    problems = validate_manifest(path, 2)
    assert len(problems) == 4, problems
    for line, word in zip((3, 4, 5, 6), ("not found", "must match", "empty", "JSON")):
        assert any(p.startswith(f"{path}:{line}:") and word in p for p in problems), (line, problems)
    (tmp_path / "s1").mkdir()
    assert validate_manifest(write_stage1(tmp_path / "s1"), 1) == []


def test_corrupt_images_stop_or_are_skipped_with_a_count(tmp_path):
    rec = recipe(tmp_path, 1, steps=1, batch_size=2)
    (tmp_path / "target1.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"train.jsonl:2:"):
        train(rec.model_copy(update={"on_corrupt": "stop"}), components())
    with pytest.warns(UserWarning, match="skipped"):
        result = train(rec, components())
    assert result.skipped >= 1 and np.isfinite(result.losses[0]["total"])


def test_batches_loaded_ahead_by_worker_processes_train_the_same_weights(tmp_path):
    rec = recipe(tmp_path, 1, steps=3, batch_size=2, checkpoint_every=10)
    (tmp_path / "target1.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped"):
        serial = train(rec, components())
    ahead = train(rec.model_copy(update={"loader_workers": 2, "output_dir": tmp_path / "ahead"}), components())
    assert ahead.step == 3 and ahead.skipped == serial.skipped >= 1
    assert [r["total"] for r in ahead.losses] == [r["total"] for r in serial.losses]
    for k, v in serial.adapter.state_dict().items():
        assert torch.equal(v, ahead.adapter.state_dict()[k]), k


DDP_SCRIPT = """
import hashlib, os, pathlib, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_train as T
from anystory_cli.train import train
rank = int(os.environ["RANK"])
result = train(T.recipe(pathlib.Path({root!r}) / f"r{{rank}}", 2, steps=2, batch_size=1), T.components())
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in result.adapter.state_dict().values())).hexdigest()
# one file per rank: lines the two processes print to one pipe can interleave
(pathlib.Path({root!r}) / f"result{{rank}}.txt").write_text(f"{{digest}} {{result.losses[0]['total']}}")
"""


def test_two_processes_end_with_identical_weights(tmp_path):
    """torchrun, gloo on CPU: ranks see different samples but step with the averaged gradient."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    files = [tmp_path / f"result{rank}.txt" for rank in (0, 1)]
    assert all(f.is_file() for f in files), done.stdout[-2000:] + done.stderr[-2000:]
    results = [f.read_text().split() for f in files]
    assert results[0][0] == results[1][0]  # identical weights on both ranks
    assert results[0][1] != results[1][1]  # from different data


def test_a_recipe_key_given_twice_is_refused(tmp_path):
    from anystory_cli.train.recipe_files import read_recipe_yaml

    path = tmp_path / "recipe.yaml"
    path.write_text("stage: 1\nstage: 2\n")
    with pytest.raises(InputError, match="recipe.yaml: not valid YAML"):
        read_recipe_yaml(path)


def test_a_run_shows_its_losses_and_samples_with_routing_maps(tmp_path):
    events = []
    train(recipe(tmp_path, 2, steps=2, checkpoint_every=2, preview_count=2), components(), progress=events.append)
    out = tmp_path / "out"
    assert [e["event"] for e in events] == ["start", "step", "step", "checkpoint"]
    assert events[1]["samples_per_s"] > 0 and np.isfinite(events[1]["routing"])
    grid = Image.open(out / "samples.png")
    # two rows; columns: 2 references, the target with its masks, the generated image, its routing map
    assert grid.size == (5 * 128, 2 * (128 + 14))
    assert (out / "samples" / "step-0000002.png").is_file() and Image.open(out / "losses.png").size[0] > 0
    routing_tile = np.asarray(grid)[14:142, 4 * 128:5 * 128]
    assert routing_tile.std() > 0  # tinted by owner, not blank


def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from anystory_cli.errors import OutputError

    rec = recipe(tmp_path, 1, steps=1, preview_count=0)
    first = train(rec, components())
    before = (first.checkpoint / "adapter.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)  # accelerate writes the optimizer state with it
    with pytest.raises(OutputError, match="checkpoint not written .No space left on device: the disk is full.*previous checkpoint is intact"):
        train(recipe(tmp_path, 1, steps=2, resume=True, preview_count=0), components())
    out = tmp_path / "out"
    assert (out / "latest").read_text().strip() == "step-0000001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no debris
    assert (out / "checkpoints" / "step-0000001" / "adapter.safetensors").read_bytes() == before
    monkeypatch.undo()
    resumed = train(recipe(tmp_path, 1, steps=2, resume=True, preview_count=0), components())
    assert resumed.step == 2


def test_the_default_base_is_named_in_a_recipe_without_a_path(tmp_path):
    write_stage1(tmp_path, 1)
    (tmp_path / "r.yaml").write_text("stage: 1\ndata: train.jsonl\noutput_dir: out\nsteps: 1\n"
                                     "pipeline: default\nimage_encoder: default\n")
    rec = load_recipe(tmp_path / "r.yaml")
    assert str(rec.pipeline) == "default" and str(rec.image_encoder) == "default"


def test_world_datasets_are_valid_manifests_of_training_identities(tmp_path):
    from anystory_cli.lab.world import split_of
    from anystory_cli.lab.world.dataset import write_dataset

    for stage in (1, 2):
        manifest = write_dataset(tmp_path / f"s{stage}", stage, 6, seed=1, size=32)
        assert validate_manifest(manifest, stage) == []
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        seeds = [s for r in rows for s in r.get("identity_seeds", [r.get("identity_seed")])]
        assert {split_of(s) for s in seeds} == {"train"}
        if stage == 2:
            assert [len(r["masks"]) for r in rows] == [2, 3, 4, 2, 3, 4]
        else:  # the target mask is exactly where the target differs from its own background
            from anystory_cli.lab.world.scenes import sample_pair
            from anystory_cli.lab.world.dataset import _rng_seed

            for index, row in enumerate(rows):
                mask = np.asarray(Image.open(tmp_path / "s1" / row["target_mask"])) > 0
                pair = sample_pair(_rng_seed(1, 1, index), "train", 32)
                assert np.array_equal(mask, pair.target.masks.any(axis=0)) and mask.any()
    again = write_dataset(tmp_path / "again", 2, 3, seed=1, size=32)  # a shorter set is a prefix
    assert (tmp_path / "s2" / "train.jsonl").read_text().startswith(again.read_text())
    for name in ("image/000002.png", "mask/000002_3.png"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes()
    parallel = write_dataset(tmp_path / "parallel", 2, 6, seed=1, size=32, workers=2)
    assert parallel.read_text() == (tmp_path / "s2" / "train.jsonl").read_text()
    for name in ("image/000005.png", "mask/000005_3.png"):
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes()


def _saved_tiny_model(folder):
    pipe = tiny.tiny_sd_pipeline()
    pipe.save_pretrained(folder / "pipe")
    tiny.tiny_image_encoder().save_pretrained(folder / "clip")


def test_the_train_command_checks_and_trains_a_recipe(tmp_path):
    from typer.testing import CliRunner

    from anystory_cli.cli import app

    write_stage2(tmp_path, 2)
    _saved_tiny_model(tmp_path)
    options = json.dumps(tiny.TINY_ADAPTER_OPTIONS)
    (tmp_path / "r.yaml").write_text(
        "kind: adapter\nstage: 2\ndata: train.jsonl\noutput_dir: out\nsteps: 2\nbatch_size: 1\ncheckpoint_every: 2\n"
        f"pipeline: pipe\nimage_encoder: clip\nadapter_options: {options}\npreview_count: 1\npreview_steps: 2\n")
    runner = CliRunner()
    checked = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--check"])
    assert checked.exit_code == 0 and "usable" in checked.output
    done = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--json"])
    assert done.exit_code == 0, done.output
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["start", "step", "step", "checkpoint"]
    assert (tmp_path / "out" / "adapter.safetensors").is_file() and (tmp_path / "out" / "samples.png").is_file()


def test_the_train_command_reports_a_bad_row_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from anystory_cli.cli import app

    manifest = write_stage1(tmp_path, 2)
    rows = manifest.read_text().splitlines()
    rows[1] = rows[1].replace("target1.png", "missing.png")
    manifest.write_text("\n".join(rows) + "\n")
    (tmp_path / "r.yaml").write_text("kind: adapter\nstage: 1\ndata: train.jsonl\noutput_dir: out\nsteps: 1\n"
                                     "on_corrupt: stop\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml"), "--check"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.jsonl:2:" in lines[0] and "missing.png" in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_the_train_command_takes_base_model_recipes_too():
    from pathlib import Path

    from typer.testing import CliRunner

    from anystory_cli.cli import app

    recipe_path = Path(__file__).parent.parent / "recipes" / "base_unet.yaml"
    runner = CliRunner()
    checked = runner.invoke(app, ["train", str(recipe_path), "--check"])
    assert checked.exit_code == 0 and "base_unet.yaml: the recipe is usable" in checked.output
    refused = runner.invoke(app, ["train", str(recipe_path), "--restart"])
    assert refused.exit_code == 1 and "always continue from their checkpoint" in refused.stderr


def test_the_train_command_trains_what_the_recipe_s_kind_says(tmp_path):
    """`kind:` chooses the trainer (no guessing from the other keys): a recipe without it, or
    with an unknown one, is one line naming the choices; the judge's recipe is checked too."""
    from typer.testing import CliRunner

    from anystory_cli.cli import app

    recipes = Path(__file__).parent.parent / "recipes"
    runner = CliRunner()
    judge = runner.invoke(app, ["train", str(recipes / "judge.yaml"), "--check"])
    assert judge.exit_code == 0 and "judge.yaml: the recipe is usable" in judge.output
    refused = runner.invoke(app, ["train", str(recipes / "judge.yaml"), "--resume"])
    assert refused.exit_code == 1 and "keeps no checkpoints" in refused.stderr
    unsaid = tmp_path / "unsaid.yaml"
    unsaid.write_text("\n".join(line for line in (recipes / "base_vae.yaml").read_text().splitlines()
                                if not line.startswith("kind:")))
    missing = runner.invoke(app, ["train", str(unsaid), "--check"])
    assert missing.exit_code == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "kind: missing" in missing.stderr and "`kind: adapter`, `kind: base`, `kind: judge`" in missing.stderr
    (tmp_path / "odd.yaml").write_text("kind: vae\nmodel: vae\n")
    odd = runner.invoke(app, ["train", str(tmp_path / "odd.yaml"), "--check"])
    assert odd.exit_code == 1 and "kind: 'vae' is not one of adapter, base, judge" in odd.stderr


def test_every_shipped_recipe_says_its_kind_and_loads_as_it():
    from anystory_cli.lab import judge, train_base
    from anystory_cli.train.recipe_files import read_recipe_yaml

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    kinds = {path.name: read_recipe_yaml(path)["kind"] for path in recipes}
    assert set(kinds.values()) == {"adapter", "base", "judge"}
    for path in recipes:
        if kinds[path.name] == "base":
            assert train_base.load_recipe(path)[0].kind == "base"
        elif kinds[path.name] == "judge":
            assert judge.load_recipe(path)[0].kind == "judge"


def write_stage1_with_masks(folder, count=3):
    rows = []
    for i in range(count):
        pair = sample_pair(i, size=32)
        mask = pair.target.masks.any(axis=0).astype(np.uint8) * 255
        rows.append({"reference": _save(folder, f"ref{i}.png", pair.reference), "reference_mask": None,
                     "target": _save(folder, f"target{i}.png", pair.target.image),
                     "target_mask": _save(folder, f"target{i}_mask.png", mask), "caption": pair.target.caption})
    return _manifest(folder, rows)


def test_character_weighted_loss_is_the_plain_mean_at_weight_zero_and_leans_on_characters():
    from anystory_cli.train.loop import weighted_mean

    generator = torch.Generator().manual_seed(0)
    error = torch.rand(3, 8, 8, generator=generator)
    coverage = torch.zeros(3, 8, 8)
    coverage[:, 2:5, 3:6] = 1.0
    assert torch.equal(weighted_mean(error, coverage, 0.0), error.mean())
    assert torch.equal(weighted_mean(error, None, 0.0), error.mean())
    assert torch.allclose(weighted_mean(error, torch.zeros(3, 8, 8), 4.0), error.mean())
    assert torch.allclose(weighted_mean(torch.full((3, 8, 8), 0.25), coverage, 4.0), torch.tensor(0.25))
    inside = torch.where(coverage > 0, 1.0, 0.0)  # all the error inside the characters
    plain, weighted = float(inside.mean()), float(weighted_mean(inside, coverage, 4.0))
    assert weighted == pytest.approx(9 * 5 / (64 + 4 * 9), rel=1e-5) and weighted > 3 * plain
    with pytest.raises(InputError, match="target masks"):
        weighted_mean(error, None, 4.0)


def test_character_weight_trains_stage_1_and_logs_the_loss_inside_the_characters(tmp_path):
    (tmp_path / "masked").mkdir()
    data = write_stage1_with_masks(tmp_path / "masked")  # recipe() writes its own rows in tmp_path
    rec = recipe(tmp_path, 1, data=str(data), character_loss_weight=4.0)
    result = train(rec, components())
    assert all(r["in_characters"] > 0 and np.isfinite(r["in_characters"]) for r in result.losses)
    assert all(r["total"] == r["diffusion"] for r in result.losses)  # the metric is not trained on
    plain = train(recipe(tmp_path / "plain", 1, data=str(data), output_dir=str(tmp_path / "plain_out")),
                  components())
    assert plain.losses[0]["diffusion"] != result.losses[0]["diffusion"]  # same draws, other weights


def test_character_weight_needs_target_masks_in_every_row(tmp_path):
    rec = recipe(tmp_path, 1, character_loss_weight=4.0)  # write_stage1: no target_mask
    with pytest.raises(InputError, match="missing field.*target_mask"):
        train(rec, components())
    assert validate_manifest(rec.data, 1) == []  # without the weight the rows are fine


def test_adapter_options_rebuild_init_adapter_keeping_what_fits(tmp_path):
    """A new router design on a trained adapter: stage 2's routers start fresh, everything that
    still fits (the whole subject encoder, the routing QFormer) is the init adapter's."""
    from anystory_cli.train.loop import make_adapter
    from anystory_cli.sd.weights import save_adapter

    parts = components()
    first = tiny.tiny_adapter(parts.pipe.unet, parts.image_encoder, seed=1)
    save_adapter(first, tmp_path / "first.safetensors")
    rec = recipe(tmp_path / "data", 2, init_adapter=str(tmp_path / "first.safetensors"),
                 adapter_options={"router_context_layers": 1, "router_context_dim": 8})
    made = make_adapter(rec, parts)
    assert made.config.router_context_layers == 1
    state, old = made.state_dict(), first.state_dict()
    assert any(".context." in key for key in state)
    for key, value in state.items():
        if key.startswith("routers."):  # fresh: the new layout, new random weights
            if key.endswith("latent_proj.weight"):
                assert value.shape != old[key].shape, key
            if key.endswith("coarse_query.weight"):
                assert not torch.equal(value, old[key]), key
        else:
            assert torch.equal(value, old[key]), key
    with pytest.raises(InputError, match="routers, which stage 1 does not train"):
        make_adapter(recipe(tmp_path / "data1", 1, init_adapter=str(tmp_path / "first.safetensors"),
                            adapter_options={"router_context_layers": 1}), parts)
    with pytest.raises(InputError, match="unknown option.*router_kontext"):
        make_adapter(recipe(tmp_path / "data2", 2, init_adapter=str(tmp_path / "first.safetensors"),
                            adapter_options={"router_kontext": 1}), parts)


def test_init_trained_groups_replaces_only_the_stage_s_groups(tmp_path):
    from anystory_cli.train.loop import make_adapter
    from anystory_cli.sd.weights import save_adapter

    parts = components()
    first = tiny.tiny_adapter(parts.pipe.unet, parts.image_encoder, seed=1)
    second = tiny.tiny_adapter(parts.pipe.unet, parts.image_encoder, seed=2)
    save_adapter(first, tmp_path / "first.safetensors")
    save_adapter(second, tmp_path / "second.safetensors")
    rec = recipe(tmp_path / "data", 2, init_adapter=str(tmp_path / "first.safetensors"),
                 init_trained_groups=str(tmp_path / "second.safetensors"))
    made = make_adapter(rec, parts).state_dict()
    for key, value in made.items():
        source = second if key.split(".")[0] in TRAINED[2] else first
        assert torch.equal(value, source.state_dict()[key]), key


def _shipped_recipe(name: str, tmp_path, **fields):
    """recipes/NAME through `load_recipe`, its `../` paths made absolute and `fields` replaced
    (the datasets it names live in runs/, which a checkout has not drawn)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    recipe = yaml.safe_load((root / "recipes" / name).read_text().replace("../", f"{root}/"))
    recipe.update({key: str(value) for key, value in fields.items()})
    copy = tmp_path / name
    copy.write_text(yaml.safe_dump(recipe))
    return load_recipe(copy)


@pytest.mark.parametrize("name", ["world_stage2.yaml", "world_stage2_context.yaml"])
def test_stage2_recipes_build_routers_that_the_shipped_ones_load_into(name, tmp_path):
    """A stage-2 recipe of the default model starts from a stage-1 adapter (the shipped one, or
    a fresh world_stage1.yaml run's) and copies the shipped routers into it (init_trained_groups),
    or continues them; its adapter_options must give them the shipped layout (context routers), or
    the run fails at its start. The trainer's
    own `make_adapter` builds both stages' adapters here."""
    from anystory_cli.train.loop import load_components, make_adapter
    from anystory_cli.sd.weights import save_adapter

    (tmp_path / "train.jsonl").write_text("")
    stage1 = _shipped_recipe("world_stage1.yaml", tmp_path, data=tmp_path / "train.jsonl")
    components = load_components(stage1)
    stage2 = _shipped_recipe(name, tmp_path, data=tmp_path / "train.jsonl")
    if "world_stage1_out" in stage2.init_adapter.as_posix():  # starts from a stage-1 run not drawn here
        fresh = save_adapter(make_adapter(stage1, components), tmp_path / "stage1.safetensors")
        stage2 = _shipped_recipe(name, tmp_path, data=tmp_path / "train.jsonl", init_adapter=fresh)
    make_adapter(stage2, components)  # ModelError if the shipped routers do not fit the recipe's


def test_a_padded_character_slot_changes_nothing_for_its_sample():
    """A batch mixing two characters and one: the lone character's sample gets an empty slot,
    marked invalid, and is predicted exactly as in a batch of its own."""
    import dataclasses

    from anystory_cli.masks import prepare_reference
    from anystory_cli.sd.attention import AnyStoryContext
    from anystory_cli.train.loop import Encoders, Sample, injection_inputs

    torch.manual_seed(0)
    parts = components()
    adapter = tiny.tiny_adapter(parts.pipe.unet, parts.image_encoder)
    encoders = Encoders(parts, adapter, torch.device("cpu"))
    reference = [prepare_reference(tiny.sprite(c, seed=i), None, 32) for i, c in enumerate([(220, 40, 40), (40, 40, 220)])]
    target = np.zeros((32, 32, 3), np.uint8)
    masks = np.zeros((2, 32, 32), np.float32)
    masks[0, :, :16], masks[1, :, 16:] = 1.0, 1.0
    two = Sample(target, reference, masks, "two on a hill")
    one = Sample(target, reference[1:], masks[1:], "one on a hill")
    with torch.no_grad():
        batch, valid = injection_inputs([two, one], adapter, encoders, 2, (16, 16), [False, False])
        alone, alone_valid = injection_inputs([one], adapter, encoders, 2, (16, 16), [False])
    assert valid.tolist() == [[True, True], [True, False]] and alone_valid.tolist() == [[True]]
    assert batch.entry_valid.tolist() == [[True, True, True], [True, False, True]]
    torch.manual_seed(1)
    noisy = torch.randn(2, 4, 16, 16)
    text, _ = encoders.text([two.caption, one.caption])

    def predict(inputs, rows):
        context = AnyStoryContext(dataclasses.replace(inputs, training=False))
        with torch.no_grad():
            return parts.pipe.unet(noisy[rows], 500, encoder_hidden_states=text[rows],
                                   cross_attention_kwargs={"anystory": context}).sample

    together = predict(batch, slice(0, 2))
    torch.testing.assert_close(together[1:], predict(alone, slice(1, 2)), atol=1e-5, rtol=1e-5)

"""A run's checkpoints (anystory_cli/train/checkpoint.py) on a tiny module: what accelerate saves
and loads, whole folders, the pointer, and a write that fails or stops half way."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from anystory_cli.errors import ModelError, OutputError
from anystory_cli.train.checkpoint import Checkpoints, WeightsFile


def _run(seed: int = 0):
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return module, optimizer, schedule


def _steps(module, optimizer, schedule, count: int, start: int = 0) -> None:
    for step in range(start, start + count):
        optimizer.zero_grad()
        module(torch.full((4, 3), float(step + 1))).pow(2).sum().backward()
        optimizer.step()
        schedule.step()


def _checkpoints(folder, module, optimizer, schedule, **options) -> Checkpoints:
    weights = WeightsFile(save=lambda path: save_file(module.state_dict(), str(path)),
                          load=lambda path: module.load_state_dict(load_file(str(path))))
    return Checkpoints(folder, optimizers=[optimizer], schedulers=[schedule], weights={"w.safetensors": weights},
                       restart_hint="delete it", **options)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = _run()
    _steps(*whole, 4)
    first = _run()
    _steps(*first, 2)
    _checkpoints(tmp_path, *first).save(2, {"note": "half"})
    second = _run(seed=1)  # other initial weights: everything comes from the checkpoint
    checkpoints = _checkpoints(tmp_path, *second)
    info = checkpoints.load(checkpoints.latest())
    assert info["step"] == 2 and info["note"] == "half"
    _steps(*second, 2, start=2)
    assert torch.equal(whole[0].weight, second[0].weight) and torch.equal(whole[0].bias, second[0].bias)
    assert second[2].last_epoch == 4 and second[1].param_groups[0]["lr"] == whole[1].param_groups[0]["lr"]


def test_only_the_newest_is_kept_with_keep_1_and_every_step_without(tmp_path):
    """keep=1 also clears what a stopped write left; without it nothing else is touched."""
    run = _run()
    for keep, folder in ((1, tmp_path / "one"), (None, tmp_path / "all")):
        checkpoints = _checkpoints(folder, *run, keep=keep)
        for step in (1, 2):
            checkpoints.save(step)
        (folder / ".step-0000003.x1y2").mkdir()  # a write that was stopped
        checkpoints.save(3)
        if keep is None:
            (folder / ".step-0000003.x1y2").rmdir()
        names = sorted(p.name for p in folder.iterdir())
        assert names == (["latest", "step-0000003"] if keep else ["latest", "step-0000001", "step-0000002",
                                                                    "step-0000003"])
        assert checkpoints.latest() == folder / "step-0000003"


def test_a_failed_write_of_the_same_step_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = _run()
    checkpoints = _checkpoints(tmp_path, *run)
    saved = checkpoints.save(1)
    before = (saved / "w.safetensors").read_bytes()
    _steps(*run, 1)
    real_replace, failed = os.replace, []

    def fail_into_place(source, target):  # the new folder cannot be renamed into place (once)
        if str(target) == str(saved) and not failed:
            failed.append(source)
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(OutputError, match="step-0000001: checkpoint not written .*previous checkpoint is intact"):
        checkpoints.save(1)
    monkeypatch.undo()
    assert failed and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000001"]
    assert (saved / "w.safetensors").read_bytes() == before


def test_a_run_stopped_between_the_two_renames_resumes_the_set_aside_checkpoint(tmp_path):
    run = _run()
    checkpoints = _checkpoints(tmp_path, *run)
    saved = checkpoints.save(1)
    os.replace(saved, tmp_path / ".step-0000001.replaced.abc")  # the old one aside, the new one not yet in place
    assert checkpoints.latest() == saved and checkpoints.load(saved)["step"] == 1


def test_an_accelerator_saves_and_loads_the_state_with_the_weights_files(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    module, optimizer, schedule = _run()
    optimizer = accelerator.prepare(optimizer)
    schedule = accelerator.prepare(schedule)
    weights = WeightsFile(save=lambda path: save_file(module.state_dict(), str(path)),
                          load=lambda path: module.load_state_dict(load_file(str(path))))
    checkpoints = Checkpoints(tmp_path, accelerator=accelerator, weights={"w.safetensors": weights})
    try:
        _steps(module, optimizer, schedule, 2)
        saved = checkpoints.save(2)
        assert sorted(p.name for p in saved.iterdir()) == [
            "optimizer.bin", "random_states_0.pkl", "run_state.json", "scheduler.bin", "w.safetensors"]
        expected = {k: v.clone() for k, v in module.state_dict().items()}
        _steps(module, optimizer, schedule, 1)
        assert checkpoints.load(saved)["step"] == 2
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in expected.items())
        assert schedule.scheduler.last_epoch == 2
    finally:
        checkpoints.close()
    assert not accelerator._save_model_state_pre_hook and not accelerator._load_model_state_pre_hook


def test_a_checkpoint_of_another_program_is_refused(tmp_path):
    run = _run()
    checkpoints = _checkpoints(tmp_path, *run)
    saved = checkpoints.save(1)
    (saved / "run_state.json").write_text('{"format": "something-else", "step": 1}')
    with pytest.raises(ModelError, match=r"run_state\.json: not a training state of this program .*delete it"):
        checkpoints.load(saved)
    (saved / "run_state.json").write_text("{")
    with pytest.raises(ModelError, match=r"run_state\.json: unreadable"):
        checkpoints.load(saved)

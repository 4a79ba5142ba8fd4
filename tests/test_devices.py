"""--device / --dtype / --offload and their environment variables."""

from __future__ import annotations

import sys

import pytest
import torch

from anystory_cli import devices
from anystory_cli.devices import DEVICE_ENV, DTYPE_ENV, OFFLOAD_ENV, Runtime, resolve_runtime
from anystory_cli.errors import InputError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (DEVICE_ENV, DTYPE_ENV, OFFLOAD_ENV):
        monkeypatch.delenv(name, raising=False)


def gpu(monkeypatch, cuda=True, mps=False):
    monkeypatch.setattr(devices, "gpu_build", lambda: cuda or mps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_auto_picks_cuda_then_mps_then_cpu_and_the_precision_follows(monkeypatch):
    gpu(monkeypatch, cuda=True, mps=True)
    assert resolve_runtime() == Runtime("cuda", "bfloat16", False)
    gpu(monkeypatch, cuda=False, mps=True)
    assert resolve_runtime() == Runtime("mps", "float32", False)
    gpu(monkeypatch, cuda=False, mps=False)
    assert resolve_runtime("auto", "auto") == Runtime("cpu", "float32", False)


def test_options_win_over_the_environment_which_wins_over_auto(monkeypatch):
    gpu(monkeypatch, cuda=True)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    monkeypatch.setenv(DTYPE_ENV, "bf16")
    assert resolve_runtime() == Runtime("cpu", "bfloat16", False)
    assert resolve_runtime(device="cuda:1", dtype="fp16") == Runtime("cuda:1", "float16", False)
    monkeypatch.setenv(OFFLOAD_ENV, "1")
    assert resolve_runtime(device="cuda").offload is True
    assert resolve_runtime(device="cuda", offload=False).offload is False


def test_a_cpu_only_torch_is_read_from_its_build_without_importing_it():
    assert devices.gpu_build() is (torch.version.cuda is not None or torch.version.hip is not None
                                   or sys.platform == "darwin")
    assert str(torch.device("cpu:0")) == "cpu:0" and resolve_runtime("cpu:0").device == "cpu:0"


def test_the_key_holds_what_changes_pixels():
    assert Runtime("cuda:1", "bfloat16", True).key() == {"device": "cuda", "dtype": "bfloat16"}
    assert Runtime("cpu", "float32").to_dict() == {"device": "cpu", "dtype": "float32", "offload": False}


def test_offload_without_cuda_is_one_clear_line(monkeypatch):
    gpu(monkeypatch, cuda=False)
    with pytest.raises(InputError, match="needs a CUDA GPU") as caught:
        resolve_runtime(offload=True)
    assert "\n" not in str(caught.value)
    monkeypatch.setenv(OFFLOAD_ENV, "yes")
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        resolve_runtime()


@pytest.mark.parametrize("device, dtype, offload, message", [
    ("cuda", None, None, "sees no CUDA GPU"),
    ("mps", None, None, "MPS is not available"),
    ("tpu", None, None, "is not a device"),
    ("cpu", "int8", None, "is not a precision"),
])
def test_bad_values_are_named(monkeypatch, device, dtype, offload, message):
    gpu(monkeypatch, cuda=False)
    with pytest.raises(InputError, match=message):
        resolve_runtime(device, dtype, offload)


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    gpu(monkeypatch, cuda=False)
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(InputError, match=DEVICE_ENV):
        resolve_runtime()
    monkeypatch.delenv(DEVICE_ENV)
    monkeypatch.setenv(OFFLOAD_ENV, "maybe")
    with pytest.raises(InputError, match=OFFLOAD_ENV):
        resolve_runtime()


def test_torchrun_processes_take_one_gpu_each(monkeypatch):
    gpu(monkeypatch, cuda=True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_runtime().device == "cuda:1"  # two GPUs here


def test_a_request_is_known_without_torch_only_where_torch_could_say_nothing_else(monkeypatch):
    gpu(monkeypatch, cuda=False)
    assert devices.request_runtime().known() == Runtime("cpu", "float32", False)
    gpu(monkeypatch, cuda=True)
    request = devices.request_runtime()
    assert request.known() is None  # a GPU build: auto needs torch
    assert devices.request_runtime("cpu", "bf16").known() == Runtime("cpu", "bfloat16", False)
    assert request.assuming("cuda") == Runtime("cuda", "bfloat16", False)
    assert request.assuming("mps") == Runtime("mps", "float32", False)
    assert request.assuming("tpu") is None and request.assuming(None) is None
    assert devices.request_runtime("cuda").assuming("cpu") is None  # only auto is assumed
    assert request.resolve() == Runtime("cuda", "bfloat16", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert request.resolve() == Runtime("cuda", "bfloat16", False)  # torch is asked once per request


def test_the_first_runtime_assumes_the_recorded_kind_only_for_auto_on_one_process(monkeypatch, tmp_path):
    from anystory_cli.render.orchestrate import first_runtime
    from anystory_cli.render.store import record_runtime

    gpu(monkeypatch, cuda=False)
    record_runtime(tmp_path, {"device": "cuda", "dtype": "bfloat16"})
    request = devices.request_runtime()
    assert first_runtime(request, tmp_path, False) == (Runtime("cpu", "float32"), False)  # a CPU build
    monkeypatch.setattr(devices, "gpu_build", lambda: True)
    request = devices.request_runtime()
    assert first_runtime(request, tmp_path, False) == (Runtime("cuda", "bfloat16"), True)
    assert first_runtime(request, tmp_path / "new", False) == (Runtime("cpu", "float32"), False)  # nothing recorded
    assert first_runtime(request, tmp_path, True) == (Runtime("cpu", "float32"), False)  # a memory plan asks torch
    assert first_runtime(devices.request_runtime("cpu"), tmp_path, False) == (Runtime("cpu", "float32"), False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert first_runtime(devices.request_runtime(), tmp_path, False) == (Runtime("cpu", "float32"), False)


# ---------------------------------------------------------------------------------------------
# the commands




def invoke(*args):
    from typer.testing import CliRunner

    from anystory_cli import cli

    return CliRunner().invoke(cli.app, [str(a) for a in args])


def test_render_json_says_where_it_ran_and_the_precision_keys_the_panels(seam, tmp_path):
    import json

    import storykit

    story = storykit.write_story(tmp_path / "story", [{"prompt": "a hill"}])
    out = tmp_path / "out"
    first = invoke("render", story, "--out", out, "--json", "--device", "cpu")
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)["stories"][0]
    assert summary["runtime"] == {"device": "cpu", "dtype": "float32", "offload": False}
    assert summary["panels_rendered"] == [1]
    again = json.loads(invoke("render", story, "--out", out, "--json", "--device", "cpu").stdout)["stories"][0]
    assert again["panels_rendered"] == []
    bf16 = json.loads(invoke("render", story, "--out", out, "--json", "--device", "cpu", "--dtype", "bf16")
                      .stdout)["stories"][0]
    assert bf16["runtime"]["dtype"] == "bfloat16" and bf16["panels_rendered"] == [1]


def test_offload_without_cuda_is_one_line_and_rc_1(seam, tmp_path, monkeypatch):
    import storykit

    gpu(monkeypatch, cuda=False)
    story = storykit.write_story(tmp_path / "story", [{"prompt": "a hill"}])
    for args in (("render", story, "--out", tmp_path / "out", "--offload"),
                 ("encode-character", tiny_sprite(tmp_path), "--name", "mira", "--offload"),
                 ("render", story, "--out", tmp_path / "out", "--device", "cuda")):
        result = invoke(*args)
        assert result.exit_code == 1, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_encode_character_json_reports_the_runtime(seam, tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    result = invoke("encode-character", tiny_sprite(tmp_path), "--name", "mira", "--json", "--dtype", "float32")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["runtime"] == {"device": "cpu", "dtype": "float32", "offload": False}
    assert data["state"] in ("encoded", "already cached") and data["name"] == "mira"


def tiny_sprite(folder):
    import tiny

    path = folder / "mira.png"
    tiny.sprite().save(path)
    return path

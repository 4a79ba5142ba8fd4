"""FLUX models whose transformer comes quantized, through `anystory render` on the tiny FLUX
fixture on a CPU: a GGUF file named in the model mapping (`transformer:`), and a folder that
`AnyStoryFluxPipeline.save_pretrained` wrote after quantizing through `quantization_config`.
The AnyStory LoRAs land on the quantized layers, the panels stay close to the float32 ones, the
memory plan only places what is stored (and says so in --json), and bad files are one line."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import storykit
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from anystory_cli import cli

pytest.importorskip("gguf")

MODEL = storykit.FLUX_MODEL
SUBJECTS = storykit.FLUX_FIXTURE / "subjects"
TINY = {"base": str(MODEL / "flux"), "redux": str(MODEL / "redux"), "adapter": str(MODEL / "anystory_flux.bin")}
EXTRA = 'pip install "anystory-cli[quant]"'


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture(scope="module")
def gguf_q8(tmp_path_factory) -> Path:
    from anystory_cli.testing import write_gguf_transformer

    path = tmp_path_factory.mktemp("gguf") / "flux-tiny-Q8_0.gguf"
    write_gguf_transformer(MODEL / "flux", path)
    return path


def write_story(folder: Path, model, panels: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    story = {
        "title": "Balls", "seed": 3, "model": model,
        "style": {"steps": 2, "resolution": 64}, "page": dict(storykit.PAGE),
        "characters": {"red": {"image": str(SUBJECTS / "red.png"), "mask": str(SUBJECTS / "red_mask.png")},
                       "blue": {"image": str(SUBJECTS / "blue.png"), "mask": str(SUBJECTS / "blue_mask.png")}},
        "panels": [{"prompt": "red and blue play", "characters": ["red", "blue"]},
                   {"prompt": "red alone", "characters": ["red"]},
                   {"prompt": "an empty park"}][:panels],
    }
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return path


def run(*args):
    return CliRunner().invoke(cli.app, ["render", *map(str, args)])


def error_lines(result) -> list[str]:
    """The error lines of a run (progress lines share stderr when it is not a terminal)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def rendered(story: Path, out: Path, *options, cache: Path) -> dict:
    result = run(story, *options, "--json", "--device", "cpu", "--cache", cache, "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["stories"][0]


@pytest.fixture
def loaded(monkeypatch) -> list:
    """Every AnyStoryFluxPipeline the render loads, with the keyword arguments it was loaded with."""
    from anystory_cli.flux import AnyStoryFluxPipeline

    pipes = []
    load = AnyStoryFluxPipeline.from_pretrained

    def recording(cls, *args, **kwargs):
        pipes.append((load(*args, **kwargs), kwargs))
        return pipes[-1][0]
    monkeypatch.setattr(AnyStoryFluxPipeline, "from_pretrained", classmethod(recording))
    return pipes


def pixel_difference(a: Path, b: Path) -> np.ndarray:
    with Image.open(a) as x, Image.open(b) as y:
        return np.abs(np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32))


# ------------------------------------------------------------------------------------------ GGUF
def test_a_gguf_story_renders_with_characters_close_to_float32_and_keyed_apart(tmp_path, gguf_q8, loaded):
    """transformer: a GGUF file next to the story: the LoRAs land on its GGUF layers as on the
    full transformer, the plan in --json says GGUF and already quantized, the panels (both with
    characters) are close to the float32 ones but keyed apart, and so are the encodings."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    from anystory_cli.render.store import panel_path, stored_key

    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "flux-Q8_0.gguf").write_bytes(gguf_q8.read_bytes())
    full_story = write_story(tmp_path / "full", TINY)
    gguf_story = write_story(tmp_path / "gguf", {**TINY, "transformer": "flux-Q8_0.gguf"})  # next to the story
    cache = tmp_path / "cache"

    full = rendered(full_story, tmp_path / "out-full", cache=cache)
    quantized = rendered(gguf_story, tmp_path / "out-gguf", "--memory", "8GB", cache=cache)
    plan = quantized["memory_plan"]
    assert plan["plan"] == "gguf-q8_0" and plan["offload"] == "none" and plan["already_quantized"] == ["transformer"]
    assert plan["quantization"] == {"transformer": "gguf-q8_0", "text_encoder": "bf16"}
    assert plan["transformer_from"] == str(tmp_path / "gguf" / "flux-Q8_0.gguf")
    assert "GGUF Q8_0 from flux-Q8_0.gguf (already quantized)" in plan["description"]
    assert full["panels_rendered"] == quantized["panels_rendered"] == [1, 2]
    assert quantized["cache_misses"] == 2 and quantized["cache_hits"] == 0  # not the float32 model's encodings

    (full_pipe, _), (gguf_pipe, options) = loaded
    assert "quantization_config" not in options  # the file's weights, never quantized again
    to_q = gguf_pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer, GGUFLinear) and isinstance(to_q.base_layer.weight, GGUFParameter)
    wrapped = [m for m in gguf_pipe.transformer.modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, GGUFLinear)]
    assert gguf_pipe.lora_layers == full_pipe.lora_layers and all(full_pipe.lora_layers.values())
    assert len(wrapped) >= max(full_pipe.lora_layers.values())

    for index in (0, 1):
        a, b = panel_path(tmp_path / "out-full", index), panel_path(tmp_path / "out-gguf", index)
        assert stored_key(a) != stored_key(b)
        difference = pixel_difference(a, b)
        # of 255 (measured: 0.07 and 0.10 on average, 1 at most): close, not the same pixels
        assert 0 < difference.mean() < 1 and difference.max() <= 16, (difference.mean(), difference.max())

    again = rendered(gguf_story, tmp_path / "out-gguf", "--memory", "8GB", cache=cache)
    assert again["panels_rendered"] == [] and len(loaded) == 2


def test_the_anystory_loras_on_gguf_layers_keep_the_characters_effect(gguf_q8):
    """What two characters change in the final latents, drawn with the GGUF Q8_0 transformer,
    against the same change drawn in float32: the reference pass, the router and the subject
    tokens run through the quantized layers and their LoRAs (benchmarks/flux_quantized_error.py:
    1.5 % apart on average over three seeds, 2.1 % at worst)."""
    from anystory_cli.flux import AnyStoryFluxPipeline
    from anystory_cli.flux.memory_apply import load_gguf_transformer

    options = dict(redux=MODEL / "redux", adapter=MODEL / "anystory_flux.bin", reference_size=64, device="cpu",
                   torch_dtype=torch.float32)
    full = AnyStoryFluxPipeline.from_pretrained(MODEL / "flux", **options)
    gguf = AnyStoryFluxPipeline.from_pretrained(
        MODEL / "flux", transformer=load_gguf_transformer(gguf_q8, MODEL / "flux", dtype=torch.float32), **options)

    def effect(pipe):
        generator = torch.Generator().manual_seed(0)
        cast = [pipe.encode_character(*storykit.flux_subject(n), generator=generator) for n in ("red", "blue")]
        draw = dict(num_inference_steps=3, height=64, width=64, output_type="latent")
        plain, drawn = (pipe("a red ball and a blue ball play in a park.", characters=c,
                             generator=torch.Generator().manual_seed(0), **draw).images for c in ([], cast))
        return drawn - plain, plain

    (full_effect, full_plain), (gguf_effect, _) = effect(full), effect(gguf)
    assert full_effect.norm() > 1e-3 * full_plain.norm()  # the characters do change the latents
    assert ((gguf_effect - full_effect).norm() / full_effect.norm()).item() < 0.1


def test_the_gguf_file_counts_in_the_model_fingerprint(tmp_path, gguf_q8):
    from anystory_cli.model_loading import model_fingerprint
    from anystory_cli.story import model_value
    from anystory_cli.testing import write_gguf_transformer

    q4 = tmp_path / "flux-Q4_0.gguf"
    write_gguf_transformer(MODEL / "flux", q4, "Q4_0")
    cache = tmp_path / "cache"
    ids = [model_fingerprint(model_value(m, "model", tmp_path), tmp_path, cache_dir=cache)
           for m in (TINY, {**TINY, "transformer": str(gguf_q8)}, {**TINY, "transformer": str(q4)})]
    assert len(set(ids)) == 3
    copy = tmp_path / "elsewhere.gguf"
    copy.write_bytes(gguf_q8.read_bytes())  # the same bytes under another name: the same model
    assert model_fingerprint(model_value({**TINY, "transformer": str(copy)}, "model", tmp_path), tmp_path,
                             cache_dir=cache) == ids[1]


def test_a_model_file_and_model_option_name_the_gguf_file_relative_to_themselves(tmp_path, gguf_q8, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "q8.gguf").write_bytes(gguf_q8.read_bytes())
    (folder / "flux.yaml").write_text(yaml.safe_dump({**TINY, "transformer": "q8.gguf"}))
    story = write_story(tmp_path / "story", str(folder / "flux.yaml"))
    said = json.loads(run(story, "--dry-run", "--json", "--memory", "8GB").output)["stories"][0]["memory_plan"]
    assert said["plan"] == "gguf-q8_0" and said["transformer_from"] == str(folder / "q8.gguf")

    monkeypatch.chdir(folder)
    inline = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + ", transformer: q8.gguf}"
    result = run(story, "--dry-run", "--json", "--model", inline, "--memory", "8GB")
    assert result.exit_code == 0, result.output
    said = json.loads(result.output)["stories"][0]
    assert said["model"].endswith("+ transformer q8.gguf")
    assert said["memory_plan"]["transformer_from"] == str(folder / "q8.gguf")


def test_the_plan_counts_the_gguf_files_bytes_and_only_places_it(tmp_path, gguf_q8):
    from anystory_cli.flux import memory
    from anystory_cli.flux.gguf_file import read_gguf_transformer
    from anystory_cli.model_loading import FluxParts
    from anystory_cli.render.memory_plan import model_shape, stored_parts

    parts = FluxParts(**TINY, transformer=str(gguf_q8))
    shape, _, _ = model_shape(parts)
    (quantization, source), = stored_parts(parts, shape).values()
    assert source == str(gguf_q8) and quantization.backend == "gguf" and quantization.name == "gguf-q8_0"
    lora = 2 * (shape.lora_params() + shape.routing_adapter_params())
    assert memory.transformer_bytes(shape, quantization) - lora == pytest.approx(
        read_gguf_transformer(gguf_q8).tensor_bytes)
    plans = memory.stored_plans(quantization)
    assert all(p.transformer == quantization and p.stored == ("transformer",) for p in plans)
    assert {p.offload for p in plans} == {"none", "model", "group", "sequential"}
    # a named plan keeps its placement with the stored transformer, unless it names another quantization
    assert memory.stored_plan(memory.PLAN_NAMES["bf16-offload"], quantization).name == "gguf-q8_0-offload"
    assert memory.stored_plan(memory.PLAN_NAMES["gguf-q8-offload"], quantization).offload == "model"
    for other in ("int8", "nf4-offload", "gguf-q4-offload"):
        assert memory.stored_plan(memory.PLAN_NAMES[other], quantization) is None
    # a budget chooses among placements only, and a stored transformer alone does not re-key panels
    choice = memory.choose_plan(12 * memory.GiB, memory.Workload(1024, 2), memory.FluxShape(),
                                plans=memory.stored_plans(memory.QUANTIZATIONS["gguf-q4"]))
    assert choice.plan.transformer.name == "gguf-q4" and choice.plan.weights_key == ""


def test_a_memory_plan_that_names_another_transformer_quantization_is_one_line(tmp_path, gguf_q8):
    story = write_story(tmp_path, {**TINY, "transformer": str(gguf_q8)})
    for extra in ([], ["--dry-run"]):
        result = run(story, "--memory", "int8", "--out", tmp_path / "out", *extra)
        assert result.exit_code == 1
        assert "plan int8 quantizes the transformer to int8, but this model's transformer comes as GGUF Q8_0" \
            in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- bad GGUF files
def foreign_gguf(path: Path) -> Path:
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def wide_gguf(path: Path) -> Path:
    """A FLUX transformer GGUF of another width than the model's configuration (wrong shapes)."""
    import gguf
    from diffusers import FluxTransformer2DModel

    config = json.loads((MODEL / "flux" / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    wide = FluxTransformer2DModel(**{**config, "attention_head_dim": 2 * config["attention_head_dim"]})
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in wide.state_dict().items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A story drawn once with the full transformer: (story folder, output folder, cache)."""
    folder = tmp_path_factory.mktemp("drawn")
    story = write_story(folder, TINY, panels=1)
    result = run(story, "--device", "cpu", "--cache", folder / "cache", "--out", folder / "out")
    assert result.exit_code == 0, result.output
    return folder, folder / "out", folder / "cache"


@pytest.mark.parametrize("bad, line", [
    ("foreign", "not a FLUX transformer GGUF file (no double-stream blocks; it holds token_embd.weight"),
    ("wide", "not a FLUX transformer GGUF file for "),
    ("truncated", "not a GGUF file, or truncated"),
    ("missing", "GGUF transformer not found"),
])
def test_a_bad_gguf_file_is_one_line_and_leaves_the_output_as_it_was(drawn, gguf_q8, bad, line):
    folder, out, cache = drawn
    path = folder / f"{bad}.gguf"
    if bad == "foreign":
        foreign_gguf(path)
    elif bad == "wide":
        wide_gguf(path)
    elif bad == "truncated":
        path.write_bytes(gguf_q8.read_bytes()[: gguf_q8.stat().st_size // 3])
    story = write_story(folder / bad, {**TINY, "transformer": str(path)}, panels=1)
    before = storykit.snapshot(out)
    for memory in ([], ["--memory", "8GB"]):
        result = run(story, *memory, "--device", "cpu", "--cache", cache, "--out", out)
        assert result.exit_code == 1, result.output
        said = error_lines(result)
        assert len(said) == 1 and line in said[0] and str(path) in said[0], result.stderr
        assert "Traceback" not in result.output
        assert storykit.snapshot(out) == before


def test_validate_reads_the_gguf_files_header(tmp_path, gguf_q8):
    from anystory_cli.render import story_problems

    assert story_problems(write_story(tmp_path / "good", {**TINY, "transformer": str(gguf_q8)})) == []
    story = write_story(tmp_path / "foreign", {**TINY, "transformer": str(foreign_gguf(tmp_path / "llama.gguf"))})
    problems = story_problems(story)
    assert len(problems) == 1 and "llama.gguf: not a FLUX transformer GGUF file" in problems[0]
    story = write_story(tmp_path / "missing", {**TINY, "transformer": "gone.gguf"})
    problems = story_problems(story)
    assert len(problems) == 1 and "gone.gguf: GGUF transformer not found" in problems[0]


def test_gguf_not_installed_names_the_extra(drawn, gguf_q8, monkeypatch):
    folder, out, cache = drawn
    story = write_story(folder / "no-gguf", {**TINY, "transformer": str(gguf_q8)}, panels=1)
    before = storykit.snapshot(out)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    for memory in ([], ["--memory", "8GB"]):
        result = run(story, *memory, "--device", "cpu", "--cache", cache, "--out", out)
        assert result.exit_code == 1
        said = error_lines(result)
        assert len(said) == 1 and "needs the gguf package, which is not installed" in said[0] and EXTRA in said[0]
        assert "Traceback" not in result.output
        assert storykit.snapshot(out) == before


# --------------------------------------------------------------- a saved, already quantized folder
@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory) -> Path:
    """The tiny fixture quantized through quantization_config (torchao int8 weight-only, diffusers'
    quant_mapping form; the transformer and T5) and saved: safetensors serialization works for
    torchao's Int8Tensor."""
    pytest.importorskip("torchao")
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig as TransformersTorchAoConfig

    from anystory_cli.flux import AnyStoryFluxPipeline

    config = PipelineQuantizationConfig(quant_mapping={
        "transformer": TorchAoConfig(Int8WeightOnlyConfig()),
        "text_encoder_2": TransformersTorchAoConfig(Int8WeightOnlyConfig())})
    pipe = AnyStoryFluxPipeline.from_pretrained(MODEL / "flux", redux=MODEL / "redux",
                                                adapter=MODEL / "anystory_flux.bin", quantization_config=config,
                                                device="cpu", torch_dtype=torch.float32)
    folder = tmp_path_factory.mktemp("saved") / "flux-int8"
    pipe.save_pretrained(folder)
    return folder


def test_a_saved_int8_folder_loads_back_quantized_with_its_loras(int8_folder):
    from anystory_cli.flux import AnyStoryFluxPipeline

    pipe = AnyStoryFluxPipeline.from_pretrained(int8_folder, device="cpu", torch_dtype=torch.float32)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight).__name__ == "Int8Tensor"
    assert all(pipe.lora_layers.values())


@pytest.mark.parametrize("memory, plan", [("8GB", "int8"), ("int8", "int8"), ("bf16", "int8"), ("auto", None)])
def test_a_saved_quantized_folder_renders_with_memory_and_says_it_is_already_quantized(
        tmp_path, int8_folder, loaded, memory, plan):
    story = write_story(tmp_path, str(int8_folder), panels=1)
    said = rendered(story, tmp_path / "out", "--memory", memory, cache=tmp_path / "cache")
    chosen = said["memory_plan"]
    assert chosen["plan"] == plan and chosen["already_quantized"] == ["transformer", "text_encoder"]
    assert chosen["quantization"] == {"transformer": "int8", "text_encoder": "int8"}
    assert chosen["text_encoder_from"] == str(int8_folder / "text_encoder_2")
    if plan is not None:
        assert chosen["description"] == ("transformer int8 (already quantized), T5 int8 (already quantized), "
                                          "all on the device")
    assert said["panels_rendered"] == [1]
    (pipe, options), = loaded
    assert "quantization_config" not in options  # no second quantization
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight).__name__ == "Int8Tensor"
    assert type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"


def test_a_quantized_base_folder_in_a_mapping_is_already_quantized_too(tmp_path, loaded):
    """A FluxPipeline quantized through quantization_config and saved, named as `base:` with the
    Redux folder and the adapter: the plan places it, nothing quantizes it again."""
    pytest.importorskip("torchao")
    from diffusers import FluxPipeline, PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    # diffusers' default for torchao integer quantization: bfloat16 scales, which the folder keeps
    FluxPipeline.from_pretrained(str(MODEL / "flux"), quantization_config=config).save_pretrained(tmp_path / "base")
    story = write_story(tmp_path / "story", {**TINY, "base": str(tmp_path / "base")}, panels=1)
    refused = run(story, "--memory", "8GB", "--device", "cpu", "--dtype", "float32", "--cache", tmp_path / "cache",
                  "--out", tmp_path / "out")
    assert refused.exit_code == 1
    assert error_lines(refused) == [f"error: {story}: model: {tmp_path / 'base' / 'transformer'}: the transformer is "
                                    "stored quantized with bfloat16 scales; this render runs in float32: render "
                                    "with --dtype bfloat16"]
    loaded.clear()
    said = rendered(story, tmp_path / "out", "--memory", "8GB", "--dtype", "bfloat16", cache=tmp_path / "cache")
    assert said["memory_plan"]["plan"] == "int8" and said["memory_plan"]["already_quantized"] == ["transformer"]
    assert said["memory_plan"]["transformer_from"] == str(tmp_path / "base" / "transformer")
    assert said["panels_rendered"] == [1]
    (pipe, options), = loaded
    assert "quantization_config" not in options
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight).__name__ == "Int8Tensor"
    assert all(pipe.lora_layers.values())


def test_diffusers_refuses_the_quant_backend_form_for_torchao_as_the_docs_say():
    """docs/flux.md sends users to quant_mapping: diffusers 0.42 with transformers 5 refuses
    PipelineQuantizationConfig(quant_backend="torchao", ...) before any model is named (its and
    transformers' TorchAoConfig signatures differ). When this starts to pass, update the docs."""
    pytest.importorskip("torchao")
    from diffusers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig

    with pytest.raises(ValueError, match="provide a `quant_mapping` instead"):
        PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": Int8WeightOnlyConfig()},
                                   components_to_quantize=["transformer"])

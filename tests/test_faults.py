"""Faults: signals, SIGKILL and resume, damaged cache entries, two renders at once, a full disk,
and symbolic links out of the output folder.

Each case ends with the outputs of an uninterrupted render (byte for byte) or the earlier
outputs intact, and no temporary file left behind.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import storykit
from anystory_cli import cli
from anystory_cli.cache import EncodingCache
from anystory_cli.render import KEY_TEXT, render_story
from anystory_cli.sd.weights import CharacterEncoding

runner = CliRunner()
TESTS = Path(__file__).parent


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture
def seam(tiny_story_pipeline, tmp_path, monkeypatch):
    factory = storykit.TinyFactory(tiny_story_pipeline)
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", factory)
    monkeypatch.setattr(cli.seams, "MODEL_FINGERPRINT", storykit.tiny_fingerprint)
    monkeypatch.setenv("ANYSTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_COLOR", "1")
    return factory


@pytest.fixture
def reference(tiny_story_pipeline, tmp_path):
    """Renders a story without any fault into a folder of its own; returns its file hashes."""

    def render(story: Path) -> dict[str, str]:
        out = tmp_path / "reference"
        render_story(story, out, pipeline_factory=storykit.TinyFactory(tiny_story_pipeline),
                     model_fingerprint=storykit.tiny_fingerprint, cache_dir=tmp_path / "reference-cache")
        return storykit.snapshot(out)

    return render


def invoke(*args: str):
    return runner.invoke(cli.app, list(args))


def error_line(result) -> str:
    """The last line on stderr: the one error line, after any progress lines."""
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
    return errors[0]


def temporary_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


class SignalOnPanel:
    """The tiny real pipeline; sends `signum` to this process as panel `panel` (1-based) starts."""

    def __init__(self, pipeline, signum, panel):
        self._pipeline, self.signum, self.panel, self.calls, self.sent_at = pipeline, signum, panel, 0, None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.panel:
            self.sent_at = time.perf_counter()
            os.kill(os.getpid(), self.signum)
        return self._pipeline(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


# --------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: stop at the next step, say what was finished, leave no partial file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_render_cleanly_and_a_rerun_finishes(seam, reference, tiny_story_pipeline,
                                                                 tmp_path, monkeypatch, signum, code):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    interrupting = SignalOnPanel(tiny_story_pipeline, signum, panel=2)
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", storykit.TinyFactory(interrupting))
    before = signal.getsignal(signum)
    result = invoke("render", str(story), "--out", str(out))
    stopped_after = time.perf_counter() - interrupting.sent_at
    assert result.exit_code == code, result.stderr
    line = error_line(result)
    assert line == (f"error: {story}: stopped by {signal.Signals(signum).name}: panel(s) 1 finished "
                    "(1 of 3 to draw); nothing is half-written, run the same command again to "
                    "finish the rest"), line
    assert stopped_after < 2.0
    assert signal.getsignal(signum) == before  # the handler is removed again
    assert (out / "panels" / "panel-001.png").is_file()
    assert not (out / "panels" / "panel-002.png").exists() and not (out / "pages").exists()
    assert temporary_files(out) == []

    result = invoke("render", str(story), "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    assert '"panels_rendered": [\n        2,\n        3\n      ]' in result.stdout
    assert storykit.snapshot(out) == reference(story)


def test_a_signal_while_the_model_loads_stops_at_once(seam, tiny_story_pipeline, tmp_path, monkeypatch):
    def slow_load(model, story_dir):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # a big model: the signal must not wait for it
        return tiny_story_pipeline

    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", slow_load)
    story = storykit.write_story(tmp_path / "s")
    start = time.perf_counter()
    result = invoke("render", str(story), "--out", str(tmp_path / "out"))
    assert time.perf_counter() - start < 5.0
    assert result.exit_code == 130
    assert error_line(result).startswith(f"error: {story}: stopped by SIGINT: no panel finished (0 of 3 to draw)")


def test_json_summary_of_an_interrupted_render(seam, tiny_story_pipeline, tmp_path, monkeypatch):
    import json

    story = storykit.write_story(tmp_path / "s")
    interrupting = SignalOnPanel(tiny_story_pipeline, signal.SIGTERM, panel=3)
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", storykit.TinyFactory(interrupting))
    result = invoke("render", str(story), "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 143
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 143 and "stopped by SIGTERM" in data["error"]
    assert data["stories"][0]["panels_rendered"] == [1, 2]


KILL_SCRIPT = """
import sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import storykit, tiny
from anystory_cli import cli

pipeline = tiny.tiny_story_pipeline()


class Hang:
    # Panel 3 hangs in the middle of its denoising loop, where SIGKILL finds it.
    calls = 0

    def __call__(self, *args, **kwargs):
        Hang.calls += 1
        if Hang.calls == 3:
            def hang(pipe, step, timestep, tensors):
                print("HANGING", flush=True)
                time.sleep(120)
            kwargs["callback_on_step_end"] = hang
        return pipeline(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(pipeline, name)


if sys.argv[1] == "wait":  # start when told to: two renders at once
    print("READY", flush=True)
    sys.stdin.readline()
    model = pipeline
else:
    model = Hang()
cli.seams.PIPELINE_FACTORY = storykit.TinyFactory(model)
cli.seams.MODEL_FINGERPRINT = storykit.tiny_fingerprint
cli.app(sys.argv[2:], prog_name="anystory")
"""


def start_worker(tmp_path: Path, mode: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(KILL_SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, str(script), mode, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(process: subprocess.Popen, word: str, timeout: float = 120.0) -> None:
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            if line.strip() == word:
                return
        raise AssertionError(f"worker ended before {word}: {process.stderr.read()[-3000:]}")
    finally:
        timer.cancel()


def test_sigkill_then_rerun_finishes_with_identical_pages(seam, reference, tmp_path):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    worker = start_worker(tmp_path, "hang", "render", str(story), "--out", str(out))
    try:
        wait_for(worker, "HANGING")
    finally:
        worker.kill()  # SIGKILL: no handler, no cleanup
        worker.communicate()
    assert worker.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "panels").iterdir()) == ["panel-001.png", "panel-002.png"]
    # What a killed writer may leave: a stale temporary file (old) is swept; a fresh one, which
    # could belong to a render running now, is not.
    stale, fresh = out / "panels" / ".panel-003.png.dead.tmp", out / ".story.pdf.live.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    result = invoke("render", str(story), "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    assert '"panels_skipped": [\n        1,\n        2\n      ]' in result.stdout
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
    assert storykit.snapshot(out) == reference(story)


def test_two_renders_into_the_same_folder_and_cache_at_once(seam, reference, tiny_story_pipeline, tmp_path):
    story = storykit.write_story(tmp_path / "s", storykit.panels() * 2)
    out, cache = tmp_path / "out", tmp_path / "shared-cache"
    worker = start_worker(tmp_path, "wait", "render", str(story), "--out", str(out), "--cache", str(cache))
    try:
        wait_for(worker, "READY")
        worker.stdin.write("go\n")
        worker.stdin.flush()
        mine = invoke("render", str(story), "--out", str(out), "--cache", str(cache))
        _, errors = worker.communicate(timeout=120)
    finally:
        worker.kill()
    assert mine.exit_code == 0, mine.stderr
    assert worker.returncode == 0, errors[-3000:]
    assert storykit.snapshot(out) == reference(story)
    assert temporary_files(out) == [] and temporary_files(cache) == []
    warnings: list[str] = []
    entries = EncodingCache(cache, on_warning=warnings.append)
    keys = [p.stem for p in (cache / "encodings").glob("*.safetensors")]
    assert len(keys) == 3 and all(entries.get(key, tiny_story_pipeline.model_id) is not None for key in keys)
    assert warnings == []


# --------------------------------------------------------------------------------------------
# The cache never returns a wrong encoding
# --------------------------------------------------------------------------------------------


def encoding(seed: int, model_id: str = "tiny:default") -> CharacterEncoding:
    generator = torch.Generator().manual_seed(seed)
    return CharacterEncoding(torch.randn(4, 8, generator=generator), torch.randn(8, generator=generator),
                             {"down.attn1": torch.randn(16, 8, generator=generator)}, model_id, "mira")


def test_an_entry_copied_under_another_key_is_not_returned(tmp_path):
    warnings: list[str] = []
    cache = EncodingCache(tmp_path, on_warning=warnings.append)
    cache.put("a" * 64, encoding(1))
    cache.path_for("b" * 64).write_bytes(cache.path_for("a" * 64).read_bytes())
    assert cache.get("b" * 64, "tiny:default") is None
    assert warnings == [f"cache entry {cache.path_for('b' * 64)} is stored under the wrong name "
                        f"(it holds key {'a' * 64!r}); encoding the character again"]
    assert torch.equal(cache.get("a" * 64, "tiny:default").subject_tokens, encoding(1).subject_tokens)


def test_concurrent_writers_and_readers_of_one_entry_never_see_a_wrong_encoding(tmp_path):
    warnings: list[str] = []
    cache = EncodingCache(tmp_path, on_warning=warnings.append)
    expected = encoding(3)
    seen: list[bool] = []

    def write():
        for _ in range(15):
            cache.put("k" * 64, encoding(3))

    def read():
        for _ in range(40):
            got = cache.get("k" * 64, "tiny:default")
            if got is not None:
                seen.append(torch.equal(got.subject_tokens, expected.subject_tokens)
                            and torch.equal(got.reference_features["down.attn1"],
                                            expected.reference_features["down.attn1"]))

    threads = [threading.Thread(target=write), threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings == [] and all(seen)
    assert temporary_files(tmp_path) == []


def test_a_corrupt_entry_is_reported_once_in_a_batch(seam, tmp_path):
    first = storykit.write_story(tmp_path / "a", [{"prompt": "mira", "characters": ["mira"]}])
    assert invoke("render", str(first), "--out", str(tmp_path / "warmup")).exit_code == 0
    for entry in (tmp_path / "cache" / "encodings").glob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:-10])  # truncated
    second = storykit.write_story(tmp_path / "b", [{"prompt": "mira again", "characters": ["mira"]}],
                                  name="other.yaml")
    result = invoke("render", str(first), str(second), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    # (the tiny model stands in for `model: default`, whose vocabulary warnings are not counted here)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: cache entry")]
    assert len(warnings) == 1 and "is corrupt or truncated" in warnings[0]
    assert "encoding the character again" in warnings[0]


# --------------------------------------------------------------------------------------------
# Out of disk space while writing pages
# --------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_pages_is_one_clear_line_and_earlier_pages_are_intact(
        seam, tmp_path, monkeypatch):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    assert invoke("render", str(story), "--out", str(out)).exit_code == 0
    before = storykit.snapshot(out)
    panels = storykit.panels()
    panels[0]["caption"] = "A calm morning."  # page 1 changes
    panels[2]["caption"] = "The very end."  # page 2 changes
    storykit.write_story(tmp_path / "s", panels)

    save = Image.Image.save

    def disk_full_on_page_2(image, fp, *args, **kwargs):
        if ".page-002.png." in str(getattr(fp, "name", "")):
            fp.write(b"\x89PNG half a page")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_on_page_2)
    result = invoke("render", str(story), "--out", str(out))
    assert result.exit_code == 1
    assert error_line(result) == (f"error: {out / 'pages' / 'page-002.png'}: write failed (No space left on "
                                  "device: the disk is full; free some space and run again); the "
                                  "previous file is intact")
    after = storykit.snapshot(out)
    assert after["pages/page-002.png"] == before["pages/page-002.png"]  # the earlier page 2
    assert after["story.pdf"] == before["story.pdf"] and after["story.cbz"] == before["story.cbz"]
    assert Image.open(out / "pages" / "page-001.png").text[KEY_TEXT]  # page 1: whole (new)
    assert temporary_files(out) == []

    monkeypatch.setattr(Image.Image, "save", save)
    result = invoke("render", str(story), "--out", str(out))
    assert result.exit_code == 0 and "0 panel(s) drawn" in result.stdout


# --------------------------------------------------------------------------------------------
# Nothing is written outside the output folder
# --------------------------------------------------------------------------------------------


def test_a_symlinked_subfolder_leading_out_is_refused(seam, tmp_path):
    story = storykit.write_story(tmp_path / "s")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "pages").symlink_to(elsewhere)
    result = invoke("render", str(story), "--out", str(out))
    assert result.exit_code == 1
    assert error_line(result) == (
        f"error: {out / 'pages' / 'page-001.png'}: not written, it would land outside the output "
        f"folder {out} ({out / 'pages'} is a symbolic link to {elsewhere}); remove the link or "
        "choose another output folder")
    assert list(elsewhere.iterdir()) == []


def test_symlinked_files_are_replaced_not_followed_and_pruning_stays_inside(seam, tmp_path):
    story = storykit.write_story(tmp_path / "s")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert invoke("render", str(story), "--out", str(out)).exit_code == 0
    # A page that is a link to a file outside; routing maps kept in a linked folder outside,
    # next to a file of that folder's owner that looks like a stale map.
    victim = elsewhere / "precious.png"
    victim.write_bytes(b"not yours")
    (out / "pages" / "page-001.png").unlink()
    (out / "pages" / "page-001.png").symlink_to(victim)
    routing = out / ".anystory" / "routing"
    (elsewhere / "maps").mkdir()
    for path in routing.iterdir():
        path.rename(elsewhere / "maps" / path.name)
    routing.rmdir()
    routing.symlink_to(elsewhere / "maps")
    (elsewhere / "maps" / "0000.png").write_bytes(b"someone else's file")
    panels = storykit.panels()
    panels[0]["caption"] = "A calm morning."
    storykit.write_story(tmp_path / "s", panels)

    result = invoke("render", str(story), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert victim.read_bytes() == b"not yours"
    page = out / "pages" / "page-001.png"
    assert not page.is_symlink() and Image.open(page).text[KEY_TEXT]
    assert (elsewhere / "maps" / "0000.png").read_bytes() == b"someone else's file"  # not pruned


def test_an_output_folder_that_is_itself_a_link_is_followed(seam, tmp_path):
    story = storykit.write_story(tmp_path / "s", [{"prompt": "mira", "characters": ["mira"]}])
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = invoke("render", str(story), "--out", str(tmp_path / "link"))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "real" / "story.pdf").is_file()

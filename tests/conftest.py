import os

import pytest

# Nothing may download at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_story_pipeline():
    """One tiny real AnyStoryPipeline (SD-1.5-shaped, random) shared by the render and CLI
    tests; built on first use, on one thread like the subprocesses of the tests that compare
    bytes with it (a random initialisation on two threads can differ in the last bit, and with
    it the model id and every image)."""
    from contextlib import contextmanager

    import storykit
    import tiny

    with contextmanager(storykit.one_torch_thread)():
        return tiny.tiny_story_pipeline()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def story_pipe(request):
    """A tiny AnyStoryPipeline on an SD-1.5-shaped and on an SDXL-shaped base."""
    import tiny

    pipe = tiny.tiny_story_pipeline(tiny.tiny_sd_pipeline() if request.param == "sd15" else tiny.tiny_sdxl_pipeline())
    yield pipe


@pytest.fixture(scope="module")
def seam(tiny_story_pipeline, tmp_path_factory):
    """The CLI's model seam holds the tiny pipeline; the cache lives in a temporary folder."""
    import storykit
    from anystory_cli import cli

    factory = storykit.TinyFactory(tiny_story_pipeline)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli.seams, "PIPELINE_FACTORY", factory)
        patch.setattr(cli.seams, "MODEL_FINGERPRINT", storykit.tiny_fingerprint)
        patch.setenv("ANYSTORY_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield factory

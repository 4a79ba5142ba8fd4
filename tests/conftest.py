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

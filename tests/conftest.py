import os

import pytest

# Nothing may download at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_story_pipeline():
    """One tiny real AnyStoryPipeline (SD-1.5-shaped, random) shared by the render and CLI
    tests; built on first use."""
    import tiny

    return tiny.tiny_story_pipeline()

"""AnyStory CLI: consistent characters across comic panels (AnyStory, arXiv 2501.09503)."""

__version__ = "0.1.0"

"""What a render reports: progress events for the CLI, and the summary of one story's render."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """kind: story | model | character | panel | step | panel_done | page | export | note |
    warning | done. `current`/`total` count: panels to draw (story, panel: before it starts,
    panel_done: after), denoising steps (step), characters (character), pages (page)."""

    kind: str
    message: str = ""
    current: int = 0
    total: int = 0


@dataclass
class RenderSummary:
    story: str
    out_dir: str
    title: str = ""
    files_written: list[str] = field(default_factory=list)
    panels_rendered: list[int] = field(default_factory=list)  # 1-based panel numbers
    panels_skipped: list[int] = field(default_factory=list)  # up to date
    pages_written: list[int] = field(default_factory=list)
    pages_skipped: list[int] = field(default_factory=list)  # up to date
    pages_incomplete: list[int] = field(default_factory=list)  # a panel is not drawn yet
    exports_written: list[str] = field(default_factory=list)
    characters_encoded: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_rebuilt: int = 0
    model_loaded: bool = False
    runtime: dict[str, Any] = field(default_factory=dict)  # device, dtype, offload
    memory_plan: dict[str, Any] | None = None  # with --memory / model.memory: the plan (render/memory_plan.py)
    loras: list[dict[str, Any]] = field(default_factory=list)  # path, scale, sha256 of each used
    warnings: list[str] = field(default_factory=list)
    # Per panel with characters: the take kept, its seed, each character's identity score (takes.py).
    scores: list[dict[str, Any]] = field(default_factory=list)
    lowest: str = ""  # the panels whose weakest character scores lowest, in words
    review: str = ""  # review.html, when written or current
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def up_to_date(self) -> bool:
        """Nothing was drawn or written: the output already matched the story."""
        return not self.panels_rendered and not self.files_written

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["up_to_date"] = self.up_to_date
        data["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return data

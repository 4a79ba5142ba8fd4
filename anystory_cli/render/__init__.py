"""From a story file to comic pages: the orchestration around the real AnyStoryPipeline.

    load + validate story -> plan panels -> (load model once) -> encode characters once (cache)
    -> draw the panels that are not up to date -> compose pages -> PNG pages, PDF, CBZ

What is kept in the output folder::

    panels/panel-001.png        each panel image; its content key in the PNG text "anystory:key"
    panels/panel-001-routing.png/.npy   with save_routing: overlay and soft maps (N+1, H, W)
    pages/page-001.png          each page; its page key in the PNG text
    characters/<name>.png       the generated sheet of a text-only character (alpha = its mask)
    <story>.pdf, <story>.cbz    written once every page is complete
    .anystory/routing/<key>.png routing maps of each panel, for balloon placement on re-runs
    .anystory/exports.json      keys and sha256 of the PDF and CBZ
    .anystory/takes/<key>.png   each take drawn, its identity scores in the PNG text (takes.py)
    panels/scores.json, review.html   identity scores of the takes kept, a page of every take (review.py)

A panel whose stored key equals its content key (prompt, characters and their reference bytes,
seed, steps, strengths, model, frame shape) is not drawn again, and a page or export whose key is
unchanged is not written again: re-running an unchanged story writes nothing, and a run that
failed or was interrupted continues from the complete files. Every file is written to a
temporary name and renamed, so a failure never leaves a half-written file or destroys an earlier
one.

`--pages` / `--panels` choose which panels are drawn. Every page whose panels are all up to date
is composed; the PDF and CBZ are written once every page is.

Scale and faults:

- Memory does not grow with the story's length: a panel is written as soon as it is drawn and
  read back only while its page is composed; pages are composed one at a time, and the PDF and
  CBZ are written page by page from the page files (`export`).
- A render with nothing to draw (an unchanged story, new lettering, page settings that only
  recompose) imports no torch, diffusers or transformers: the panels' keys need only the model
  files' fingerprint and the runtime, which `devices` knows without torch on a CPU-only install
  or with `--device cpu`.
- Several stories in one process share the loaded model (`memoize_factory`) and the character
  cache, so a character with the same image is encoded once.
- Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the processes join one gloo process
  group; rank 0's list of panels to draw is shared, rank r draws panels r, r + W, r + 2W, ...
  of it, and rank 0 composes the pages and exports once every rank has finished. Each panel is
  drawn from its own seed, and pages are composed from the stored panels and routing maps (the
  maps as stored, also in one process), so the result is the same bytes as in one process.
- Inside `stop_on_signals()` (the CLI uses it), SIGINT or SIGTERM stop the render at the next
  denoising step, character, panel or page with `Interrupted` (exit code 128 + signal), which
  says what was finished; nothing is half-written and a re-run continues.
- Every output is written inside the output folder: a sub-folder that is a symbolic link leading
  out of it is refused (`atomic.check_within`), and nothing outside it is pruned.

A text-only character (a description, no image) gets a character sheet, drawn by the model,
cut out and encoded like a reference image (`characters`).

torch is reached only through the pipeline object (and a torch.Generator for the seed).
Progress goes to a callback as plain `ProgressEvent`s; nothing here prints.

Where each part lives:

    orchestrate.py  render_story: the steps above, in order
    validate.py     story problems without a model, --pages / --panels
    model.py        the model, loaded once, and what a render asks of it
    characters.py   characters encoded once (cache), text-only characters drawn as sheets
    sheets.py       a sheet's character cut out, character cards, `anystory encode-character`
    store.py        panel PNGs and their content keys, routing maps, paths in the output folder
    compose.py      routing overlays, pages, PDF and CBZ, pruning
    takes.py        each panel's takes drawn, scored (scores.py), stored, the best one kept
    review.py       scores.json and review.html
    signals.py      SIGINT / SIGTERM: stop at the next safe point
    ranks.py        torchrun / accelerate launch: the panels shared out between processes
    events.py       ProgressEvent and RenderSummary
"""


from .characters import character_keys, sheet_settings
from .events import ProgressEvent, RenderSummary
from .model import memoize_factory
from .orchestrate import render_story
from .ranks import Ranks
from .signals import Interrupted, stop_on_signals
from .store import KEY_TEXT, STATE_DIR, aspect_multipliers, check_output_dir, frame_sizes
from .validate import check_story, layout_problems, lettering_problems, parse_ranges, select_panels, story_problems

__all__ = [
    "KEY_TEXT",
    "STATE_DIR",
    "Interrupted",
    "ProgressEvent",
    "Ranks",
    "RenderSummary",
    "aspect_multipliers",
    "character_keys",
    "check_output_dir",
    "check_story",
    "frame_sizes",
    "layout_problems",
    "lettering_problems",
    "memoize_factory",
    "parse_ranges",
    "render_story",
    "select_panels",
    "sheet_settings",
    "stop_on_signals",
    "story_problems",
]

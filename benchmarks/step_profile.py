"""Where the AnyStory step's extra time goes: CPU time per part of a denoising step, plain against
two characters, on the same small SDXL-shaped UNet as `step_overhead.py`.

Each part (the attention processors, the router, the sorting of pixels by character, ...) is
wrapped so that the main thread's CPU time spent inside it is added up, on 1 thread, plain and
AnyStory steps interleaved round by round. Times are per step, averaged over every UNet forward
(the first step included, which also projects the subject and reference keys and values once).

    python benchmarks/step_profile.py               # prints a Markdown table
    python benchmarks/step_profile.py --rounds 4
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from step_overhead import characters_for, small_sdxl, step_times

from anystory_cli.sd import attention

# (owner, attribute, label): the parts of the step that AnyStory adds or replaces.
PARTS = [
    (attention.CrossAttentionProcessor, "inject", "cross-attention layer (AnyStory)"),
    (attention.CrossAttentionProcessor, "_route", "  router: gates of the layer"),
    (attention.CrossAttentionProcessor, "_gathered", "  text + subject attention, sorted pixels"),
    (attention.SelfAttentionProcessor, "inject", "self-attention layer (AnyStory)"),
    (attention.SelfAttentionProcessor, "_gathered", "  own + reference attention, sorted pixels"),
    (attention, "_pixel_groups", "pixels sorted by character (argmax, argsort)"),
]
TOTALS: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()


def _timed(function, label_of):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            label = label_of(args, kwargs)
            TOTALS[label] += time.thread_time() - start
            CALLS[label] += 1

    return timed


def _plain_label(args, kwargs):
    context = args[3] if len(args) > 3 else kwargs.get("encoder_hidden_states")
    return "cross-attention layer (plain)" if context is not None else "self-attention layer (plain)"


def instrument(pipe) -> None:
    for owner, name, label in PARTS:
        if not hasattr(owner, name):  # (older trees lack some parts)
            continue
        timed = _timed(getattr(owner, name), lambda a, k, label=label: label)
        static = isinstance(vars(owner).get(name), staticmethod)
        setattr(owner, name, staticmethod(timed) if static else timed)
    AttnProcessor2_0.__call__ = _timed(AttnProcessor2_0.__call__, _plain_label)

    def unet_label(args, kwargs):
        injected = "anystory" in (kwargs.get("cross_attention_kwargs") or {})
        return "UNet forward (AnyStory)" if injected else "UNet forward (plain)"

    pipe.unet.forward = _timed(pipe.unet.forward, unet_label)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = small_sdxl()
    characters = characters_for(pipe, 2)
    instrument(pipe)
    step_times(pipe, None, 2)
    step_times(pipe, characters, 2)
    TOTALS.clear()
    CALLS.clear()
    steps = {"plain": [], "two": []}
    for _ in range(args.rounds):
        steps["plain"] += step_times(pipe, None, args.steps, time.thread_time)
        steps["two"] += step_times(pipe, characters, args.steps, time.thread_time)
    forwards = args.rounds * args.steps  # UNet forwards per configuration
    print("| part | calls per step | CPU ms per step |")
    print("|---|---|---|")
    for label in sorted(TOTALS, key=lambda k: (k.lstrip() != k, -TOTALS[k])):
        print(f"| {label} | {CALLS[label] / forwards:.0f} | {1000 * TOTALS[label] / forwards:.1f} |")
    plain, two = (statistics.median(steps[k]) for k in ("plain", "two"))
    print(f"\nmedian step (CPU, 1 thread): plain {1000 * plain:.0f} ms, two characters {1000 * two:.0f} ms, "
          f"x{two / plain:.3f}")


if __name__ == "__main__":
    main()

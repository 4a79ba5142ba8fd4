"""Where the AnyStory step's extra time goes: CPU time per part of a denoising step, plain against
two characters, on the same small SDXL-shaped UNet as `step_overhead.py`.

Each part (the attention processors, the router, the sorting of pixels by character, ...) is
wrapped so that the main thread's CPU time spent inside it is added up, on 1 thread, plain and
AnyStory steps interleaved round by round. Times are per step, averaged over every UNet forward
(the first step included, which also projects the subject and reference keys and values once).

    python benchmarks/step_profile.py               # prints a Markdown table
    python benchmarks/step_profile.py --rounds 4
    python benchmarks/step_profile.py --layers      # one layer of each resolution, part by part
    python benchmarks/step_profile.py --threads 2   # wall time on 2 threads instead
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
from anystory_cli.sd.adapter import install

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
CLOCK = {"now": time.thread_time}  # the main thread's CPU time on 1 thread, wall time on more
CALLS: collections.Counter = collections.Counter()


def _timed(function, label_of):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = CLOCK["now"]()
        try:
            return function(*args, **kwargs)
        finally:
            label = label_of(args, kwargs)
            TOTALS[label] += CLOCK["now"]() - start
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


def _median_ms(function, repeats: int = 30) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        function()
        times.append(time.thread_time() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def layer_costs(pipe, characters) -> None:
    """Median CPU time of one transformer block's attention layers at 32x32 and at 16x16 tokens,
    plain and with two characters (batch of 2: both halves of guidance), and of their parts."""
    inputs = pipe._injection_inputs(characters, None, 1, (64, 64), 1.0, 0.0, False)
    context = attention.AnyStoryContext(inputs)
    installed = install(pipe.adapter, pipe.unet)
    modules = dict(pipe.unet.named_modules())
    plain = AttnProcessor2_0()
    torch.manual_seed(0)
    print("| layer | plain | two characters | router | subject attentions | pixel sort |")
    print("|---|---|---|---|---|---|")
    for block, tokens in (("down_blocks.1.attentions.0.transformer_blocks.0", 1024),
                          ("down_blocks.2.attentions.0.transformer_blocks.0", 256)):
        self_attn, cross_attn = modules[block + ".attn1"], modules[block + ".attn2"]
        states = torch.randn(2, tokens, cross_attn.to_q.in_features)
        text = torch.randn(2, 77, cross_attn.to_k.in_features)
        context.begin_forward(2)
        size = context.spatial_size(tokens)
        processor = cross_attn.processor
        _, _, gates = processor._route(context, states, size)
        groups = attention._pixel_groups(gates)
        context.previous_routes = gates.view(*gates.shape[:2], *size)
        query = attention._split_heads(cross_attn.to_q(states), cross_attn.heads)
        key, value = processor._subject_kv(context, cross_attn.heads)

        def subject_attentions():
            for entry, part in groups[0].segments():
                torch.nn.functional.scaled_dot_product_attention(query[:, :, part], key[:, entry], value[:, entry])

        def anystory_cross():
            context.previous_routes = None  # a fresh routing, sorted again
            return processor(cross_attn, states, text, anystory=context)

        cross = (_median_ms(lambda: plain(cross_attn, states, text)), _median_ms(anystory_cross),
                 _median_ms(lambda: processor._route(context, states, size)), _median_ms(subject_attentions),
                 _median_ms(lambda: attention._pixel_groups(gates)))
        print(f"| cross-attention, {tokens} tokens | " + " | ".join(f"{t:.2f} ms" for t in cross) + " |")
        _, _, gates = processor._route(context, states, size)
        context.previous_routes = gates.view(*gates.shape[:2], *size)
        own = (_median_ms(lambda: plain(self_attn, states)),
               _median_ms(lambda: self_attn.processor(self_attn, states, None, anystory=context)))
        print(f"| self-attention, {tokens} tokens | " + " | ".join(f"{t:.2f} ms" for t in own) + " | | | |")
    installed.remove()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", action="store_true", help="time one layer of each resolution instead")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads > 1:
        CLOCK["now"] = time.perf_counter
    pipe = small_sdxl()
    characters = characters_for(pipe, 2)
    if args.layers:
        layer_costs(pipe, characters)
        return
    instrument(pipe)
    step_times(pipe, None, 2)
    step_times(pipe, characters, 2)
    TOTALS.clear()
    CALLS.clear()
    steps = {"plain": [], "two": []}
    for _ in range(args.rounds):
        steps["plain"] += step_times(pipe, None, args.steps, CLOCK["now"])
        steps["two"] += step_times(pipe, characters, args.steps, CLOCK["now"])
    forwards = args.rounds * args.steps  # UNet forwards per configuration
    unit = "CPU ms" if args.threads == 1 else "wall ms"
    print(f"| part | calls per step | {unit} per step |")
    print("|---|---|---|")
    for label in sorted(TOTALS, key=lambda k: (k.lstrip() != k, -TOTALS[k])):
        print(f"| {label} | {CALLS[label] / forwards:.0f} | {1000 * TOTALS[label] / forwards:.1f} |")
    plain, two = (statistics.median(steps[k]) for k in ("plain", "two"))
    print(f"\nmedian step ({unit[:-3]}, {args.threads} thread(s)): plain {1000 * plain:.0f} ms, two characters {1000 * two:.0f} ms, "
          f"x{two / plain:.3f}")


if __name__ == "__main__":
    main()

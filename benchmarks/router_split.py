"""Where the router puts a character's pixels (docs/default-model.md, docs/evaluation.md).

    python benchmarks/router_split.py [--cutout] [--adapter FILE] [--threads N]

On the noised rendered held-out scenes `anystory evaluate adapter` scores the router on (the same
scenes and noise, `evaluate.routing_eval_scenes` and `noised_routing_maps`), at t = 20 and 100,
for each 16x16 cross-attention layer: the share of a character's pixels (area > 1/2) whose hard
routing goes to its own entry, to another character's, to the background, and the mean top
probability there. `--cutout` encodes each character from the scene itself (as stage 2 trains)
instead of its canonical reference. The IoUs themselves are in `anystory evaluate adapter`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anystory_cli.lab.evaluate import noised_routing_maps, routing_eval_scenes
from anystory_cli.model_loading import load_pipeline
from anystory_cli.lab.world.scenes import reference_image

SCENES, TIMESTEPS, SIDE = 12, [100, 20], 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cutout", action="store_true")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("default", adapter=args.adapter)
    references = {}

    def characters_of(scene):
        if args.cutout:
            return [pipe.encode_character(Image.fromarray(scene.image), mask=mask.astype(np.uint8) * 255)
                    for mask in scene.masks]
        for s in scene.identity_seeds:
            if s not in references:
                references[s] = pipe.encode_character(Image.fromarray(reference_image(s)))
        return [references[s] for s in scene.identity_seeds]

    shares = defaultdict(lambda: defaultdict(list))  # (layer, t) -> own / other / background / top
    scenes = routing_eval_scenes(SCENES, 0, SIDE * pipe.base.vae_scale_factor)
    with torch.inference_mode():
        for scene, t, layers in noised_routing_maps(pipe, scenes, characters_of, 0, TIMESTEPS):
            masks = torch.from_numpy(scene.masks).float()[:, None]
            truth = F.interpolate(masks, size=(SIDE, SIDE), mode="area")[:, 0] > 0.5
            count = len(scene.identity_seeds)
            for name, maps in layers.items():
                if maps.shape[-1] != SIDE:
                    continue
                hard = maps[0].argmax(0)
                for i in range(count):
                    if truth[i].any():
                        routed = hard[truth[i]]
                        row = shares[(name, t)]
                        row["own"].append((routed == i).float().mean().item())
                        row["other"].append(((routed != i) & (routed < count)).float().mean().item())
                        row["background"].append((routed == count).float().mean().item())
                        row["top"].append(maps[0][:, truth[i]].max(0).values.mean().item())
    for (name, t), row in sorted(shares.items()):
        print(f"{name:55s} t={t:4d}  a character's pixels: own {np.mean(row['own']):.2f}, "
              f"another character {np.mean(row['other']):.2f}, background {np.mean(row['background']):.2f}; "
              f"top probability {np.mean(row['top']):.2f}")


if __name__ == "__main__":
    main()

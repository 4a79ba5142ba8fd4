"""How well can a router tell characters apart from the features it reads? (docs/default-model.md)

    python benchmarks/router_keys_probe.py [--keys linear|mlp|conv1|conv2|conv3] [--loss mse|ce] [--layer 2]
                                           [--adapter FILE]

On noised rendered scenes (t = 20, 100, 300), the shipped default model is run once per scene
with its characters, and at each 16x16 cross-attention layer the router's inputs are kept: the
routing features of the scene's characters and the background, and the layer's latent tokens.
Then a fresh router is trained on those frozen inputs alone (600 scenes of training identities)
and scored on 150 scenes of held-out ones, beside the shipped router on the same inputs: the share
of a character's pixels routed to it, and the instance IoU, as `anystory evaluate adapter` counts
them. The keys are the paper's per-token projection (`linear`), a per-token MLP (`mlp`), or
one to three 3x3 convolutions of the token grid first (`conv1` to `conv3`, `router_context_layers`).
The captured inputs are kept in runs/router_keys/ (a few minutes to make, reused). The model card's
figures are on an adapter with per-token routers (`git show 834a478:anystory_cli/assets/default/anystory_adapter.safetensors`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from anystory_cli.lab.evaluate import noised_routing_maps
from anystory_cli.model_loading import load_pipeline
from anystory_cli.sd import router as router_module
from anystory_cli.sd.router import MASKED, LayerRouter
from anystory_cli.lab.world.scenes import reference_image, sample_scene

SIDE, TIMESTEPS, ENTRIES = 16, [20, 100, 300], 5  # 4 characters at most, then the background
SPLITS = {"train": (600, 1000), "heldout": (150, 5000)}  # scenes, first scene seed
CACHE = Path("runs/router_keys")


def capture(split: str, adapter: str | None) -> list[dict]:
    """Per scene and timestep: the shipped routers' inputs at each 16x16 layer, the owner of each
    latent pixel (a character covering more than half of it, else the background) and the shipped
    router's hard routes."""
    path = CACHE / f"{split}-{Path(adapter).stem if adapter else 'default'}.pt"
    if path.is_file():
        return torch.load(path)
    count, first = SPLITS[split]
    pipe = load_pipeline("default", adapter=adapter)
    inputs, original = [], LayerRouter.forward

    def keep_inputs(self, routing, tokens, bias=None, size=None):
        if tokens.shape[1] == SIDE * SIDE:
            inputs.append((routing[0].half(), tokens[0].half()))
        return original(self, routing, tokens, bias, size)

    router_module.LayerRouter.forward = keep_inputs
    references = {}

    def characters(scene):
        for s in scene.identity_seeds:
            if s not in references:
                references[s] = pipe.encode_character(Image.fromarray(reference_image(s)))
        return [references[s] for s in scene.identity_seeds]

    scenes = [sample_scene(first + i, 2 + i % 3, split, 64) for i in range(count)]
    records = []
    with torch.inference_mode():
        for scene, t, maps in noised_routing_maps(pipe, scenes, characters, first, TIMESTEPS):
            cover = F.interpolate(torch.from_numpy(scene.masks).float()[:, None], size=(SIDE, SIDE), mode="area")
            cover = cover[:, 0].flatten(1)
            n = cover.shape[0]
            owner = torch.where(cover.max(0).values > 0.5, cover.argmax(0), n)
            shipped = [m[0].flatten(1).argmax(0) for m in maps.values() if m.shape[-1] == SIDE]
            records.append(dict(t=t, n=n, owner=owner, layers=list(inputs), shipped=shipped))
            inputs.clear()
    router_module.LayerRouter.forward = original
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(records, path)
    return records


def stack(records: list[dict], layer: int):
    """Padded batch: routing features (B, ENTRIES, r), tokens (B, L, d), valid entries, owners
    with the background as entry ENTRIES - 1."""
    routing = torch.zeros(len(records), ENTRIES, records[0]["layers"][layer][0].shape[-1])
    valid = torch.zeros(len(records), ENTRIES, dtype=torch.bool)
    owners = torch.stack([r["owner"] for r in records]).clone()
    for b, r in enumerate(records):
        features, n = r["layers"][layer][0].float(), r["n"]
        routing[b, :n], routing[b, -1] = features[:n], features[n]
        valid[b, :n], valid[b, -1] = True, True
        owners[b][owners[b] == n] = ENTRIES - 1
    tokens = torch.stack([r["layers"][layer][1].float() for r in records])
    return routing, tokens, valid, owners


def make_router(keys: str, routing_dim: int, latent_dim: int) -> LayerRouter:
    if keys.startswith("conv"):
        return LayerRouter(routing_dim, latent_dim, 64, context_layers=int(keys[4:]), context_dim=128)
    router = LayerRouter(routing_dim, latent_dim, 64)
    if keys == "mlp":
        router.latent_proj = nn.Sequential(nn.Linear(latent_dim, 256), nn.GELU(), nn.Linear(256, 3 * 64 + routing_dim))
    return router


def train_router(router, routing, tokens, valid, owners, loss_kind: str, iterations: int) -> None:
    optimizer = torch.optim.AdamW(router.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(iterations):
        idx = torch.randint(0, len(owners), (64,))
        bias = torch.where(valid[idx, :, None], 0.0, MASKED).expand(-1, -1, tokens.shape[1])
        coarse, fine = router(routing[idx], tokens[idx], bias, (SIDE, SIDE))
        if loss_kind == "ce":
            loss = F.cross_entropy(fine, owners[idx]) + F.cross_entropy(coarse, owners[idx])
        else:  # paper Eq. 4: squared error of the characters' soft maps against their masks
            target = F.one_hot(owners[idx], ENTRIES).permute(0, 2, 1).float()[:, :-1]
            weight = valid[idx, :-1, None].float()
            loss = sum((((x.softmax(1)[:, :-1] - target) ** 2) * weight).mean(-1).sum() / weight.sum()
                       for x in (coarse, fine))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def score(records: list[dict], predictions) -> dict[int, tuple[float, float]]:
    """Per timestep: (share of a character's pixels routed to it, instance IoU), mean over characters."""
    own, iou = {}, {}
    for r, predicted in zip(records, predictions):
        for i in range(r["n"]):
            truth = r["owner"] == i
            if truth.any():
                own.setdefault(r["t"], []).append((predicted[truth] == i).float().mean().item())
                iou.setdefault(r["t"], []).append(((predicted == i) & truth).sum().item()
                                                  / ((predicted == i) | truth).sum().item())
    return {t: (float(np.mean(own[t])), float(np.mean(iou[t]))) for t in sorted(own)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", choices=["linear", "mlp", "conv1", "conv2", "conv3"], default="conv2")
    parser.add_argument("--loss", choices=["mse", "ce"], default="mse")
    parser.add_argument("--layer", type=int, default=2, help="which 16x16 layer, in forward order (2: the last)")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--adapter", default=None, help="adapter file (default: the shipped one)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, heldout = capture("train", args.adapter), capture("heldout", args.adapter)
    torch.manual_seed(0)
    routing, tokens, valid, owners = stack(train, args.layer)
    router = make_router(args.keys, routing.shape[-1], tokens.shape[-1])
    train_router(router, routing, tokens, valid, owners, args.loss, args.iterations)
    routing, tokens, valid, _ = stack(heldout, args.layer)
    with torch.no_grad():
        bias = torch.where(valid[:, :, None], 0.0, MASKED).expand(-1, -1, tokens.shape[1])
        predicted = router(routing, tokens, bias, (SIDE, SIDE))[1].argmax(1)
    predicted = [torch.where(p == ENTRIES - 1, r["n"], p) for p, r in zip(predicted, heldout)]
    for name, figures in ((f"{args.keys} keys, {args.loss} loss, trained here", score(heldout, predicted)),
                          ("the adapter's own router", score(heldout, [r["shipped"][args.layer] for r in heldout]))):
        print(f"{name:40s} " + "; ".join(f"t={t}: own {o:.2f}, IoU {u:.2f}" for t, (o, u) in figures.items()))


if __name__ == "__main__":
    main()

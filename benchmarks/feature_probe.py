"""Do the base UNet's features at a character's latent pixel say who it is? (docs/default-model.md)

    python benchmarks/feature_probe.py

A linear probe per latent pixel of the character's body colour and pattern, from the hidden
states a router reads (the input of a 16x16 cross-attention; alone, and with the mean of their
3x3 or 5x5 neighbourhood beside them) and from the VAE latents, on noised
rendered scenes: trained on 300 scenes of training identities, tested on 100 of held-out ones.
"""
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from anystory_cli.default_model import DEFAULT_ASSETS, load_default_base
from anystory_cli.lab.world.identity import identity_from_seed
from anystory_cli.lab.world.scenes import sample_scene



def main():
    torch.set_num_threads(2)
    pipe, _ = load_default_base(DEFAULT_ASSETS)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    LAYERS = ["up_blocks.2.attentions.0.transformer_blocks.0.attn2", "down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    captured = {}
    for name in LAYERS:
        mod = pipe.unet.get_submodule(name)
        mod.register_forward_pre_hook(lambda m, args, kwargs, name=name: captured.__setitem__(name, (kwargs.get("hidden_states", args[0] if args else None))), with_kwargs=True)

    def features(split, count, t, seed0):
        X = {k: [] for k in LAYERS + ["latent"] + [f"{k} +{side}x{side}" for k in LAYERS for side in (3, 5)]}; Y = {"body_colour": [], "pattern": []}
        for i in range(count):
            scene = sample_scene(seed0 + i, 2 + i % 3, split, 64)
            px = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
            with torch.inference_mode():
                lat = pipe.vae.encode(px).latent_dist.mean * pipe.vae.config.scaling_factor
                noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(i))
                noisy = sched.add_noise(lat, noise, torch.tensor([t]))
                text = pipe.encode_prompt(scene.caption, "cpu", 1, False)[0]
                pipe.unet(noisy, t, encoder_hidden_states=text)
            cover = F.interpolate(torch.from_numpy(scene.masks).float()[:, None], size=(16, 16), mode="area")[:, 0]
            owner = cover.argmax(0); inside = cover.max(0).values > 0.5
            idx = inside.flatten().nonzero()[:, 0]
            for k in LAYERS:
                X[k].append(captured[k][0][idx].float())
                # the same pixel with the mean of its 3x3 and 5x5 neighbourhoods beside it
                grid = captured[k][0].float().T.reshape(1, -1, 16, 16)
                for side in (3, 5):
                    pooled = F.avg_pool2d(grid, side, stride=1, padding=side // 2, count_include_pad=False)
                    X[f"{k} +{side}x{side}"].append(torch.cat([captured[k][0].float(), pooled[0].flatten(1).T], 1)[idx])
            X["latent"].append(lat[0].flatten(1).T[idx])
            for j in idx.tolist():
                a = identity_from_seed(scene.identity_seeds[owner.flatten()[j]]).attributes()
                Y["body_colour"].append(a["body_colour"]); Y["pattern"].append(a["pattern"])
        return {k: torch.cat(v) for k, v in X.items()}, {k: torch.tensor(v) for k, v in Y.items() if v}

    def probe(xtr, ytr, xte, yte):
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        n = int(max(ytr.max(), yte.max())) + 1
        w = torch.zeros(xtr.shape[1], n, requires_grad=True); b = torch.zeros(n, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(300):
            loss = F.cross_entropy(xtr @ w + b, ytr) + 1e-3 * w.pow(2).sum()
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            return ((xte @ w + b).argmax(1) == yte).float().mean().item(), (yte == torch.mode(ytr).values).float().mean().item()

    for t in (20, 100):
        xtr, ytr = features("train", 300, t, 1000)
        xte, yte = features("heldout", 100, t, 5000)
        for attr in ("body_colour", "pattern"):
            for k in xtr:
                acc, chance = probe(xtr[k], ytr[attr], xte[k], yte[attr])
                print(f"t={t:3d} {attr:12s} {k:55s} probe accuracy {acc:.2f} (majority {chance:.2f}; {len(yte[attr])} held-out pixels)", flush=True)


if __name__ == "__main__":
    main()

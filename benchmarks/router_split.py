"""Where the router's pixels go on noised rendered held-out scenes (the model card's session-9 figures).

    python benchmarks/router_split.py [THREADS] [--cutout] [--adapter=FILE]

For the 12 scenes `anystory evaluate adapter` scores the router on, at t = 20 and 100 and each
16x16 cross-attention layer: foreground IoU, per-character IoU, and where a character's pixels
go (its own entry, another character's, the background). --cutout encodes each character from
the scene itself (as stage 2 trains) instead of its canonical reference.
"""
import sys
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from diffusers import DDPMScheduler
from anystory_cli.model_loading import load_pipeline
from anystory_cli.world.scenes import reference_image, sample_scene
from anystory_cli.world.rng import WorldRng

CUTOUT = '--cutout' in sys.argv

def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    adapter = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--adapter=")), None)
    pipe = load_pipeline("default", adapter=adapter)
    rng = WorldRng("evaluate-adapter-routing", 0)
    scenes = [sample_scene(rng.integer(1 << 40), 2 + i % 3, "heldout", 64) for i in range(12)]
    sched = DDPMScheduler.from_config(pipe.base.scheduler.config)
    vae = pipe.base.vae
    enc = {}
    stats = {}
    for n, scene in enumerate(scenes):
        px = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        lat = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(n))
        chars = []
        for i, s in enumerate(scene.identity_seeds):
            if CUTOUT:
                chars.append(pipe.encode_character(Image.fromarray(scene.image), mask=scene.masks[i].astype(np.uint8) * 255, name=str(s)))
                continue
            if s not in enc:
                enc[s] = pipe.encode_character(Image.fromarray(reference_image(s)), name=str(s))
            chars.append(enc[s])
        masks = torch.from_numpy(scene.masks).float()[:, None]
        for t in (100, 20):
            noisy = sched.add_noise(lat, noise, torch.tensor([t]))
            with torch.inference_mode():
                layers = pipe.route_latents(noisy, t, scene.caption, chars)
            for name, maps in layers.items():
                h, w = maps.shape[-2:]
                if h != 16:
                    continue
                hard = maps[0].argmax(0)
                truth = F.interpolate(masks, size=(h, w), mode="area")[:, 0] > 0.5
                K = len(chars)
                fg_pred = hard < K
                fg_true = truth.any(0)
                fg_iou = (fg_pred & fg_true).sum().item() / max(1, (fg_pred | fg_true).sum().item())
                inst = [((hard == i) & truth[i]).sum().item() / max(1, ((hard == i) | truth[i]).sum().item()) for i in range(K)]
                # best permutation-free: IoU if each char took the predicted instance that overlaps it most
                best = [max(((hard == j) & truth[i]).sum().item() / max(1, ((hard == j) | truth[i]).sum().item()) for j in range(K)) for i in range(K)]
                # soft-map foreground mass inside the truth
                soft = maps[0]
                st = stats.setdefault((name, t), {"fg": [], "inst": [], "best": [], "ceil": []})
                st["fg"].append(fg_iou); st["inst"] += inst; st["best"] += best
                for i in range(K):
                    px = truth[i]
                    if px.sum() == 0:
                        continue
                    st.setdefault("own", []).append((hard[px] == i).float().mean().item())
                    st.setdefault("other", []).append(((hard[px] != i) & (hard[px] < K)).float().mean().item())
                    st.setdefault("bg", []).append((hard[px] == K).float().mean().item())
                    st.setdefault("pmax", []).append(maps[0][:, px].max(0).values.mean().item())
    for (name, t), st in sorted(stats.items()):
        print(f"{name:60s} t={t:4d} fg IoU {np.mean(st['fg']):.2f}  instance IoU {np.mean(st['inst']):.2f}  best-match IoU {np.mean(st['best']):.2f} | a character's pixels: own {np.mean(st['own']):.2f} other {np.mean(st['other']):.2f} bg {np.mean(st['bg']):.2f}, max prob {np.mean(st['pmax']):.2f}")

if __name__ == "__main__":
    main()

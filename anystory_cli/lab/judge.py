"""The independent judge: small CNNs that read a sprite-world picture back into words.

Trained only on *rendered* ground truth (never on generated images), with training identities
only, so that it can grade what the base model and AnyStory draw:

    judge = load_judge()                          # the shipped weights (assets/judge/)
    verdicts = judge.read_scenes(images)          # uint8 (B, 64, 64, 3) -> [SceneVerdict]
    judge.read_characters(images, boxes)          # -> [CharacterVerdict]: attributes + pose
    judge.character_log_probs(images, boxes)      # the same crops' log-probabilities per head
    identity_log_likelihood(log_probs, identity.attributes())   # how well a crop fits an identity
    score_scene(verdict, scene_truth(scene))      # what the verdict got right, per image

Two networks (sizes in `JudgeConfig`):

- `SceneNet` reads the whole 64x64 image. Pooled features give the place, the time of day, the
  prop and the number of characters (0-4). A dense head at 32x32 (one cell = 2x2 pixels) locates
  the characters CenterNet-style: a centre heatmap, the box size and the sub-cell offset of the
  centre at each cell, and a foreground map. The count head decides how many characters there
  are; the locator's strongest peaks give their boxes, left to right.
- `CharacterNet` reads a square crop around one box (resized to 32x32) and predicts every
  attribute of `world.ATTRIBUTE_CLASSES` (NOT_APPLICABLE is ignored by the loss) and the pose.

Position words are the caption's: with one character, left / center / right from the box centre
(the rendered world's box centres never cross the splits below); with 2-4 characters, the ranks
left, (middle | second, third), right.

Training (`anystory train recipes/judge.yaml`, under 20 minutes on one CPU thread):
a pool of rendered training scenes (and a few empty backgrounds), part of it also passed through
the shipped VAE once (generated images come out of that decoder), then mild blur, noise, colour
jitter and horizontal flips on the fly; SceneNet learns faster and trains during the first
`scene_steps` only, CharacterNet throughout. The held-out report uses unseen scene seeds with held-out
identities, as rendered and after a VAE round trip, and is stored in `assets/judge/judge.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError
from .world.background import PLACES, PROPS, TIMES, draw_background, sample_setting
from .world.identity import ATTRIBUTE_CLASSES, NOT_APPLICABLE, identity_from_seed
from .world.rng import WorldRng
from .world.scenes import MAX_CHARACTERS, ORDER_WORDS, Scene, placeable_scene, sample_scene
from .world.sprites import POSES

JUDGE_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "judge"
WEIGHTS_FORMAT = "anystory-judge/1"
STRIDE = 2  # one locator cell = 2x2 pixels
COUNTS = tuple(range(MAX_CHARACTERS + 1))  # 0..4 characters
# Box-centre x (share of the width) that separates left | center | right for a lone character.
# Rendered lone characters have box centres in [0.20, 0.375], [0.414, 0.586], [0.625, 0.81]
# (3000 scenes measured), so the midpoints of the gaps split them with no error.
SINGLE_SPLITS = (0.395, 0.605)
SCENE_HEADS = {"place": PLACES, "time": TIMES, "prop": PROPS, "count": COUNTS}
CHARACTER_HEADS = {**ATTRIBUTE_CLASSES, "pose": POSES}


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int = 64
    # SceneNet channels at 32, 16, 8 and 4 cells per side (the first layer has stride 2).
    scene_widths: tuple[int, ...] = (32, 64, 96, 128)
    # CharacterNet: crop side in pixels and channels at crop/1, /2, /4.
    crop_size: int = 32
    crop_margin: float = 0.15  # the square crop's side is (1 + margin) x the box's longer side
    character_widths: tuple[int, ...] = (32, 64, 128)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JudgeConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelError(f"JudgeConfig: unknown fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ---------------------------------------------------------------------------------------------
# networks


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _pointwise(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SceneNet(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> scene logits and the 32x32 locator maps."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        w1, w2, w3, w4 = config.scene_widths
        self.down1 = nn.Sequential(_conv(3, w1, 2), _conv(w1, w1))    # 32x32 (no full-resolution layer)
        self.down2 = nn.Sequential(_conv(w1, w2, 2), _conv(w2, w2))   # 16x16
        self.down3 = nn.Sequential(_conv(w2, w3, 2), _conv(w3, w3))   # 8x8
        self.down4 = _conv(w3, w4, 2)                                 # 4x4
        self.heads = nn.ModuleDict({name: nn.Linear(2 * w4, len(classes)) for name, classes in SCENE_HEADS.items()})
        # Decoder, kept thin (it runs at 16x16 and 32x32): 1x1 to narrow the concatenation, then 3x3.
        self.up2 = nn.Sequential(_pointwise(w3 + w2, w2 // 2), _conv(w2 // 2, w2 // 2))  # 8 -> 16, with the skip
        self.up1 = nn.Sequential(_pointwise(w2 // 2 + w1, w1 // 2), _conv(w1 // 2, w1 // 2))  # 16 -> 32
        # heatmap logit, box width and height (share of the image), centre offset in cells, foreground logit
        self.locator = nn.Conv2d(w1 // 2, 6, 1)
        with torch.no_grad():
            self.locator.bias.zero_()
            self.locator.bias[0] = -2.19  # CenterNet's prior: sigmoid = 0.1

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = self.down1(pixels)
        f2 = self.down2(f1)
        f3 = self.down3(f2)
        f4 = self.down4(f3)
        pooled = torch.cat([f4.mean((2, 3)), f4.amax((2, 3))], dim=1)
        out = {name: head(pooled) for name, head in self.heads.items()}
        u2 = self.up2(torch.cat([F.interpolate(f3, scale_factor=2.0, mode="nearest"), f2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0, mode="nearest"), f1], 1))
        maps = self.locator(u1)
        out["heatmap"] = maps[:, 0]          # (B, 32, 32) logits
        out["size"] = maps[:, 1:3]           # (B, 2, 32, 32)
        out["offset"] = maps[:, 3:5]         # (B, 2, 32, 32)
        out["foreground"] = maps[:, 5]       # (B, 32, 32) logits
        return out


class CharacterNet(nn.Module):
    """(N, 3, crop, crop) in [-1, 1] -> logits of every attribute and the pose.

    The heads read the flattened crop/8 x crop/8 feature map, not a global pool: where a colour
    sits (top: accessory; middle: body and pattern; sides and bottom: arms and feet) is what
    tells the body colour from the pattern's and the secondary one. A pooled head learned
    several times slower (trial runs)."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        c0, c1, c2 = config.character_widths
        self.features = nn.Sequential(
            _conv(3, c0), _conv(c0, c0),            # crop
            _conv(c0, c1, 2), _conv(c1, c1),        # crop / 2
            _conv(c1, c2, 2), _conv(c2, c2),        # crop / 4
            _conv(c2, c2, 2),                       # crop / 8
        )
        self.dropout = nn.Dropout(0.2)
        flat = c2 * (config.crop_size // 8) ** 2
        self.heads = nn.ModuleDict({name: nn.Linear(flat, len(classes)) for name, classes in CHARACTER_HEADS.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dropout(self.features(crops).flatten(1))
        return {name: head(features) for name, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------
# verdicts and ground truth


@dataclass(frozen=True)
class Located:
    """One character the locator found: its box (pixels, exclusive ends), peak score, word."""

    box: tuple[float, float, float, float]
    score: float
    position: str


@dataclass(frozen=True)
class SceneVerdict:
    place: str
    time: str
    prop: str
    count: int
    characters: tuple[Located, ...]  # left to right, as many as `count`

    def to_dict(self) -> dict:
        return {
            "place": self.place, "time": self.time, "prop": self.prop, "count": self.count,
            "characters": [{"box": [round(v, 1) for v in c.box], "score": round(c.score, 3),
                            "position": c.position} for c in self.characters],
        }


@dataclass(frozen=True)
class CharacterVerdict:
    attributes: dict[str, int]  # attribute -> class index; NOT_APPLICABLE where the judge saw none
    pose: str

    def describe(self) -> dict[str, str]:
        return {name: ("n/a" if index == NOT_APPLICABLE else ATTRIBUTE_CLASSES[name][index])
                for name, index in self.attributes.items()}


def verdict_of(log_probs: dict[str, np.ndarray]) -> CharacterVerdict:
    """The most likely class of every head; what does not apply without a pattern / an
    accessory is not read."""
    attributes = {name: int(np.argmax(log_probs[name])) for name in ATTRIBUTE_CLASSES}
    if ATTRIBUTE_CLASSES["pattern"][attributes["pattern"]] == "none":
        attributes["pattern_colour"] = attributes["pattern_scale"] = NOT_APPLICABLE
    if ATTRIBUTE_CLASSES["accessory"][attributes["accessory"]] == "none":
        attributes["accessory_colour"] = NOT_APPLICABLE
    return CharacterVerdict(attributes=attributes, pose=POSES[int(np.argmax(log_probs["pose"]))])


def identity_log_likelihood(log_probs: dict[str, np.ndarray], attributes: dict[str, int]) -> float:
    """log p(a crop shows an identity with `attributes`) under the judge, attributes taken as
    independent; one that does not apply (the colour of no pattern) adds nothing, since "none"
    of its parent attribute already carries the evidence."""
    return float(sum(log_probs[name][index] for name, index in attributes.items() if index != NOT_APPLICABLE))


@dataclass(frozen=True)
class SceneTruth:
    """What a caption (and its rendered scene) says; characters left to right."""

    place: str
    time: str
    prop: str
    count: int
    positions: tuple[str, ...]
    poses: tuple[str, ...]
    boxes: tuple[tuple[int, int, int, int], ...]
    identity_seeds: tuple[int, ...]


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def scene_truth(scene: Scene) -> SceneTruth:
    """Ground truth read from the scene's masks (count, boxes) and its instances (words, poses)."""
    visible = [i for i in range(len(scene.masks)) if scene.masks[i].any()]
    return SceneTruth(
        place=scene.setting.place, time=scene.setting.time, prop=scene.setting.prop, count=len(visible),
        positions=tuple(scene.instances[i].position for i in visible),
        poses=tuple(scene.instances[i].pose for i in visible),
        boxes=tuple(_box_of(scene.masks[i]) for i in visible),
        identity_seeds=tuple(scene.instances[i].identity_seed for i in visible),
    )


def position_words(centres_x: Sequence[float], width: int) -> list[str]:
    """Caption words of characters whose box centres are `centres_x`, already left to right."""
    count = len(centres_x)
    if count == 0:
        return []
    if count == 1:
        share = centres_x[0] / width
        return ["left" if share < SINGLE_SPLITS[0] else "right" if share > SINGLE_SPLITS[1] else "center"]
    return list(ORDER_WORDS[count])


def score_scene(verdict: SceneVerdict, truth: SceneTruth, poses: Sequence[str] | None = None) -> dict:
    """What the verdict got right. Positions (and poses, given the judge's pose of each located
    character) count per caption character, and only when the judge found as many characters
    as the caption has; with one character the word must match too."""
    count_ok = verdict.count == truth.count
    words = [c.position for c in verdict.characters]
    position_ok = [count_ok and words[i] == truth.positions[i] for i in range(truth.count)]
    record = {
        "place": verdict.place == truth.place, "time": verdict.time == truth.time,
        "prop": verdict.prop == truth.prop, "count": count_ok,
        "positions": position_ok,
    }
    record["scene"] = record["place"] and record["time"]
    if poses is not None:
        record["poses"] = [count_ok and poses[i] == truth.poses[i] for i in range(truth.count)]
    return record


def summarise(records: list[dict]) -> dict[str, float]:
    """Accuracies over images (place, time, scene, prop, count) and characters (position, pose)."""
    out: dict[str, float] = {}
    for key in ("place", "time", "scene", "prop", "count"):
        out[key] = rounded_mean([r[key] for r in records])
    out["position"] = rounded_mean([ok for r in records for ok in r["positions"]])
    if records and all("poses" in r for r in records):
        out["pose"] = rounded_mean([ok for r in records for ok in r["poses"]])
    return out


def rounded_mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# the judge


def to_pixels(images: np.ndarray | torch.Tensor, size: int | None = 64) -> torch.Tensor:
    """uint8 (B, H, W, 3), or float (B, H, W, 3) in [0, 1] -> float (B, 3, size, size) in [-1, 1]
    (size None: (B, 3, H, W), not resized)."""
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"the judge reads (batch, height, width, 3) images, got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() * 2.0 - 1.0 if torch.is_floating_point(x) else \
        x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def crop_characters(pixels: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, size: int,
                    margin: float) -> torch.Tensor:
    """Square crops (N, 3, size, size) centred on `boxes` (N, 4: x0, y0, x1, y1 in pixels) of
    `pixels[image_index]`; the side is (1 + margin) x the box's longer side; edges repeat."""
    _, _, height, width = pixels.shape
    boxes = boxes.float()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=4.0) * (1 + margin)
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0] = side / width
    theta[:, 0, 2] = 2 * cx / width - 1
    theta[:, 1, 1] = side / height
    theta[:, 1, 2] = 2 * cy / height - 1
    grid = F.affine_grid(theta, [len(boxes), 3, size, size], align_corners=False)
    return F.grid_sample(pixels[image_index], grid, mode="bilinear", padding_mode="border", align_corners=False)


class Judge(nn.Module):
    """Both networks and the decoding of their outputs into verdicts."""

    def __init__(self, config: JudgeConfig = JudgeConfig(), info: dict | None = None):
        super().__init__()
        self.config = config
        self.info = dict(info or {})  # what judge.json says besides the config (accuracies, training)
        self.scene_net = SceneNet(config)
        self.character_net = CharacterNet(config)

    @torch.no_grad()
    def read_scenes(self, images, batch_size: int = 256) -> list[SceneVerdict]:
        verdicts: list[SceneVerdict] = []
        for start in range(0, len(images), batch_size):
            pixels = to_pixels(images[start:start + batch_size], self.config.image_size)
            verdicts.extend(self._decode(self.scene_net.eval()(pixels)))
        return verdicts

    def _decode(self, out: dict[str, torch.Tensor]) -> list[SceneVerdict]:
        size = self.config.image_size
        labels = {name: out[name].argmax(1).tolist() for name in SCENE_HEADS}
        heat = torch.sigmoid(out["heatmap"])
        peaks = heat * (F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0] == heat)
        cells = heat.shape[-1]
        verdicts = []
        for b in range(heat.shape[0]):
            count = COUNTS[labels["count"][b]]
            scores, flat = peaks[b].flatten().topk(count) if count else (torch.empty(0), torch.empty(0, dtype=torch.long))
            found = []
            for score, index in zip(scores.tolist(), flat.tolist()):
                j, i = divmod(index, cells)
                ox, oy = out["offset"][b, :, j, i].clamp(0, 1).tolist()
                w, h = (out["size"][b, :, j, i].clamp(min=0.02) * size).tolist()
                cx, cy = (i + ox) * STRIDE, (j + oy) * STRIDE
                found.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), score, cx))
            found.sort(key=lambda item: item[2])
            words = position_words([cx for *_, cx in found], size)
            characters = tuple(Located(tuple(float(v) for v in box), float(score), word)
                               for (box, score, _), word in zip(found, words))
            verdicts.append(SceneVerdict(
                place=PLACES[labels["place"][b]], time=TIMES[labels["time"][b]], prop=PROPS[labels["prop"][b]],
                count=count, characters=characters,
            ))
        return verdicts

    @torch.no_grad()
    def character_log_probs(self, images, boxes: Sequence[Sequence[Sequence[float]]],
                            as_drawn: bool = False) -> list[list[dict[str, np.ndarray]]]:
        """`boxes[b]` lists boxes (x0, y0, x1, y1, pixels of the judge's image size) in image b;
        returns, in the same nesting, each crop's log-probabilities: head name -> (classes,).
        `as_drawn` crops from the images at their own size instead of squashed into the judge's
        square, so that a wide or tall panel's characters keep their proportions (a squashed one
        looks thinner or stockier: its build is an attribute). The same for square images."""
        size = self.config.image_size
        pixels = to_pixels(images, None if as_drawn else size)
        flat = [(b, box) for b, image_boxes in enumerate(boxes) for box in image_boxes]
        result: list[list[dict[str, np.ndarray]]] = [[] for _ in boxes]
        if not flat:
            return result
        index = torch.tensor([b for b, _ in flat])
        scale = torch.tensor([pixels.shape[-1], pixels.shape[-2]] * 2, dtype=torch.float32) / size
        crops = crop_characters(pixels, torch.tensor([list(box) for _, box in flat], dtype=torch.float32) * scale,
                                index, self.config.crop_size, self.config.crop_margin)
        out = {name: logits.log_softmax(1).numpy() for name, logits in self.character_net.eval()(crops).items()}
        for n, (b, _) in enumerate(flat):
            result[b].append({name: values[n] for name, values in out.items()})
        return result

    def read_characters(self, images, boxes: Sequence[Sequence[Sequence[float]]]) -> list[list[CharacterVerdict]]:
        """`boxes[b]` lists boxes (x0, y0, x1, y1, pixels of the judge's image size) in image b;
        returns the verdicts in the same nesting."""
        return [[verdict_of(log_probs) for log_probs in image] for image in self.character_log_probs(images, boxes)]

    def read(self, images) -> list[tuple[SceneVerdict, list[CharacterVerdict]]]:
        """Scenes, then every located character read from its box."""
        verdicts = self.read_scenes(images)
        characters = self.read_characters(images, [[c.box for c in v.characters] for v in verdicts])
        return list(zip(verdicts, characters))


def save_judge(judge: Judge, folder: Path = JUDGE_ASSETS, info: dict | None = None) -> Path:
    """judge.safetensors (fp16 floats) + judge.json (config and `info`), each atomically."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    folder = Path(folder)
    tensors = {k: (v.half() if torch.is_floating_point(v) else v).detach().contiguous().cpu()
               for k, v in judge.state_dict().items()}
    with atomic_path(folder / "judge.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": WEIGHTS_FORMAT})
    data = {"config": judge.config.to_dict(), **(info if info is not None else judge.info)}
    with atomic_path(folder / "judge.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return folder / "judge.safetensors"


def load_judge(folder: Path | str = JUDGE_ASSETS) -> Judge:
    """The judge in `folder` (the shipped one by default), in fp32 and eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config_file = folder / "judge.safetensors", folder / "judge.json"
    if not weights.is_file() or not config_file.is_file():
        raise ModelError(f"{folder}: no judge here (judge.safetensors + judge.json); train one with "
                         f"`anystory train recipes/judge.yaml`")
    data = json.loads(config_file.read_text())
    info = {k: v for k, v in data.items() if k != "config"}
    judge = Judge(JudgeConfig.from_dict(data.get("config", {})), info)
    state = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in load_file(str(weights)).items()}
    try:
        judge.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: does not match judge.json ({str(exc).splitlines()[0]})") from None
    return judge.eval()


# ---------------------------------------------------------------------------------------------
# training data: rendered scenes, targets, augmentation


@dataclass
class Pool:
    """Rendered scenes as arrays; characters padded to MAX_CHARACTERS (count says how many).
    A scene drawn at another panel shape is stored squashed into the square, as the judge reads
    such a panel; `native` keeps its own pixels for the VAE round trip."""

    images: np.ndarray          # uint8 (N, 64, 64, 3)
    vae_images: np.ndarray      # uint8 (M, 64, 64, 3): the first M images after a VAE round trip
    place: np.ndarray           # int (N,)
    time: np.ndarray
    prop: np.ndarray
    count: np.ndarray
    boxes: np.ndarray           # float (N, 4, 4), in the square's pixels
    attributes: np.ndarray      # int (N, 4, len(ATTRIBUTE_CLASSES)), NOT_APPLICABLE where none
    pose: np.ndarray            # int (N, 4)
    foreground: np.ndarray      # float16 (N, 32, 32): share of each cell covered by characters
    native: dict[int, np.ndarray] = field(default_factory=dict)  # index -> uint8 (H, W, 3), other shapes

    def __len__(self) -> int:
        return len(self.images)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3): the inverse of `to_pixels`."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def squash(images: np.ndarray, size: int = 64) -> np.ndarray:
    """uint8 (B, H, W, 3) resized to (B, size, size, 3) exactly as the judge resizes a panel of
    another shape (`to_pixels`), back in uint8."""
    return to_uint8(to_pixels(images, size))


def empty_scene_image(rng_seed: int, size: int | tuple[int, int] = 64) -> tuple[np.ndarray, Any]:
    """A background with no character (count 0) and its setting."""
    height, width = (size, size) if isinstance(size, int) else size
    setting = sample_setting(WorldRng("judge-empty", int(rng_seed)), 1.0)
    return draw_background(setting, height, width), setting


def render_pool(count: int, split: str, seed: int, empty_share: float = 0.0, salt: str = "judge-pool",
                size: int = 64, shapes: Sequence[tuple[int, int]] = (), shape_share: float = 0.0) -> Pool:
    """`count` scenes of `split` identities with 1-4 characters (uniform), plus empty backgrounds.
    A `shape_share` of them is drawn at one of `shapes` (height, width), uniformly, and squashed
    into the square; a tall shape may hold fewer characters than drawn (they must fit side by
    side). Without shapes, no draw is spent on them: the square pools stay what they were."""
    rng = WorldRng(salt, seed, split)
    n = MAX_CHARACTERS
    arrays = dict(
        images=np.zeros((count, size, size, 3), np.uint8), place=np.zeros(count, np.int64),
        time=np.zeros(count, np.int64), prop=np.zeros(count, np.int64), count=np.zeros(count, np.int64),
        boxes=np.zeros((count, n, 4), np.float32),
        attributes=np.full((count, n, len(ATTRIBUTE_CLASSES)), NOT_APPLICABLE, np.int64),
        pose=np.full((count, n), -1, np.int64),
        foreground=np.zeros((count, size // STRIDE, size // STRIDE), np.float16),
    )
    native: dict[int, np.ndarray] = {}
    for k in range(count):
        scene_seed = rng.integer(1 << 40)
        shape = (size, size)
        if shapes and rng.chance(shape_share):
            shape = tuple(shapes[rng.integer(len(shapes))])
        if rng.chance(empty_share):
            image, setting = empty_scene_image(scene_seed, shape)
            truth = None
        else:
            characters = 1 + rng.integer(MAX_CHARACTERS)
            scene = (sample_scene(scene_seed, characters, split, size) if shape == (size, size) else
                     placeable_scene(WorldRng(salt, "retry", scene_seed), scene_seed, characters, split, shape))
            image, setting, truth = scene.image, scene.setting, scene_truth(scene)
            union = torch.from_numpy(scene.masks.any(0).astype(np.float32))[None, None]
            cells = size // STRIDE
            arrays["foreground"][k] = F.adaptive_avg_pool2d(union, (cells, cells))[0, 0].numpy()
        if shape != (size, size):
            native[k] = image
            image = squash(image[None], size)[0]
        arrays["images"][k] = image
        arrays["place"][k] = PLACES.index(setting.place)
        arrays["time"][k] = TIMES.index(setting.time)
        arrays["prop"][k] = PROPS.index(setting.prop)
        if truth is not None:
            scale = np.array([size / shape[1], size / shape[0]] * 2, np.float32)
            arrays["count"][k] = truth.count
            for i in range(truth.count):
                arrays["boxes"][k, i] = np.asarray(truth.boxes[i], np.float32) * scale
                arrays["attributes"][k, i] = list(identity_from_seed(truth.identity_seeds[i]).attributes().values())
                arrays["pose"][k, i] = POSES.index(truth.poses[i])
    return Pool(vae_images=np.zeros((0, size, size, 3), np.uint8), native=native, **arrays)


def pool_round_trip(vae, pool: Pool, count: int) -> np.ndarray:
    """The first `count` images of `pool` after a VAE round trip, as generated panels come out of
    the decoder: a scene of another shape goes through the VAE at its own shape, then is squashed."""
    def source(k: int) -> np.ndarray:
        return pool.native.get(k, pool.images[k])

    out = pool.images[:count].copy()
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k in range(count):
        by_shape.setdefault(source(k).shape, []).append(k)
    for shape, indices in by_shape.items():
        trip = vae_round_trip(vae, np.stack([source(k) for k in indices]))
        out[indices] = trip if shape == pool.images.shape[1:] else squash(trip, pool.images.shape[1])
    return out


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 images encoded (latent mean) and decoded by `vae`, as a generated image would be."""
    out = np.empty_like(images)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out[start:start + batch_size] = to_uint8(y)
    return out


def locator_targets(boxes: np.ndarray, counts: np.ndarray, size: int = 64) -> dict[str, torch.Tensor]:
    """CenterNet targets at 32x32 for boxes (B, 4, 4) of which the first counts[b] are real:
    a Gaussian around each centre (exactly 1 at the centre cell), box size (share of the image)
    and centre offset within the cell at the centre cells, and the mask of those cells."""
    cells = size // STRIDE
    batch = len(boxes)
    heat = np.zeros((batch, cells, cells), np.float32)
    reg = np.zeros((batch, 4, cells, cells), np.float32)
    centre = np.zeros((batch, cells, cells), np.float32)
    grid = np.arange(cells, dtype=np.float32) + 0.5
    for b in range(batch):
        for x0, y0, x1, y1 in boxes[b, : counts[b]]:
            cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
            w, h = x1 - x0, y1 - y0
            sigma = float(np.clip(min(w, h) / STRIDE / 8, 0.7, 2.0))
            g = np.exp(-((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) / (2 * sigma**2))
            heat[b] = np.maximum(heat[b], g)
            i, j = min(int(cx), cells - 1), min(int(cy), cells - 1)
            heat[b, j, i] = 1.0
            reg[b, :, j, i] = (w / size, h / size, cx - i, cy - j)
            centre[b, j, i] = 1.0
    return {"heat": torch.from_numpy(heat), "reg": torch.from_numpy(reg), "centre": torch.from_numpy(centre)}


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    flipped = boxes.copy()
    flipped[..., 0], flipped[..., 2] = width - boxes[..., 2], width - boxes[..., 0]
    return flipped


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild colour jitter, blur and noise on (B, 3, H, W) in [-1, 1]. Mild, because colours are
    what the judge reads: the time of day shades the land, and a character's colours are its
    identity."""
    batch = pixels.shape[0]

    def uniform(*shape, spread):
        return (torch.rand(*shape, generator=generator) * 2 - 1) * spread

    mean = pixels.mean((1, 2, 3), keepdim=True)
    x = (pixels - mean) * (1 + uniform(batch, 1, 1, 1, spread=0.08)) + mean
    x = x * (1 + uniform(batch, 3, 1, 1, spread=0.03)) + uniform(batch, 1, 1, 1, spread=0.05)
    # A 3x3 Gaussian blur of random strength (sigma 0.2-0.9 px) on about half of the images.
    sigma = 0.2 + 0.7 * torch.rand(batch, generator=generator)
    sigma = torch.where(torch.rand(batch, generator=generator) < 0.5, sigma, torch.full_like(sigma, 0.05))
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0])[None, :] / (2 * sigma[:, None] ** 2))
    taps = taps / taps.sum(1, keepdim=True)
    kernel = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(3, 0)[:, None]  # (B*3, 1, 3, 3)
    height, width = x.shape[-2:]
    x = F.conv2d(F.pad(x.reshape(1, batch * 3, height, width), (1, 1, 1, 1), mode="replicate"), kernel,
                 groups=batch * 3).reshape(batch, 3, height, width)
    x = x + torch.randn(x.shape, generator=generator) * (0.04 * torch.rand(batch, 1, 1, 1, generator=generator))
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# losses


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    positive = target.eq(1).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos = -(log_p * (1 - p) ** 2 * positive).sum()
    neg = -(log_not_p * p**2 * (1 - target) ** 4 * (1 - positive)).sum()
    return (pos + neg) / positive.sum().clamp(min=1)


def scene_loss(out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
    parts = {name: F.cross_entropy(out[name], batch[name]) for name in SCENE_HEADS}
    targets = batch["locator"]
    parts["heatmap"] = focal_loss(out["heatmap"], targets["heat"])
    centre = targets["centre"][:, None]
    cells = centre.sum().clamp(min=1)
    parts["size"] = 5 * (F.l1_loss(out["size"], targets["reg"][:, :2], reduction="none") * centre).sum() / cells
    parts["offset"] = (F.l1_loss(out["offset"], targets["reg"][:, 2:], reduction="none") * centre).sum() / cells
    parts["foreground"] = F.binary_cross_entropy_with_logits(out["foreground"], batch["foreground"])
    return sum(parts.values()), parts


def character_loss(out: dict, attributes: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, dict]:
    terms = [F.cross_entropy(out[name], attributes[:, k], ignore_index=NOT_APPLICABLE)
             for k, name in enumerate(ATTRIBUTE_CLASSES) if (attributes[:, k] != NOT_APPLICABLE).any()]
    parts = {"attributes": torch.stack(terms).mean(), "pose": F.cross_entropy(out["pose"], pose)}
    return sum(parts.values()), parts


# ---------------------------------------------------------------------------------------------
# the recipe and the training loop


def _recipe_classes():
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    class JudgeRecipe(BaseModel):
        """recipes/judge.yaml; relative paths are relative to the recipe's folder."""

        model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

        kind: Literal["judge"] = "judge"  # what `anystory train` trains
        seed: int = 0
        threads: int = Field(default=1, gt=0)
        pool_scenes: int = Field(default=8000, gt=0)  # rendered training scenes (train identities)
        empty_share: float = Field(default=0.04, ge=0, le=1)  # backgrounds without characters
        vae_scenes: int = Field(default=3000, ge=0)  # of the pool, also passed through the shipped VAE
        vae_probability: float = Field(default=0.6, ge=0, le=1)  # show the VAE version when there is one
        steps: int = Field(gt=0)  # CharacterNet trains all of them
        scene_steps: int | None = Field(default=None, gt=0)  # SceneNet, the first ones (None: all)
        batch_size: int = Field(default=64, gt=0)
        crops_per_step: int = Field(default=96, gt=0)
        box_jitter: float = Field(default=0.08, ge=0)  # crop centre / side jitter, share of the side
        lr: float = Field(default=2e-3, gt=0)
        warmup_steps: int = Field(default=100, ge=0)
        min_lr_ratio: float = Field(default=0.05, ge=0, le=1)
        weight_decay: float = Field(default=1e-4, ge=0)
        grad_clip: float = Field(default=2.0, gt=0)
        heldout_scenes: int = Field(default=512, gt=0)  # held-out identities, unseen scene seeds
        # Panels of other shapes (height, width), read squashed into the square: a share of the
        # pool is drawn at one of them, and each gets its own held-out report of heldout_scenes / 2.
        other_shapes: list[tuple[int, int]] = []
        other_shape_share: float = Field(default=0.0, ge=0, le=1)
        crops_from_other_shapes: bool = False  # CharacterNet: crops of square scenes only
        max_minutes: float = Field(default=20.0, gt=0)  # stop (and publish) after this long in all
        log_every: int = Field(default=25, gt=0)
        vae_dir: str = "../anystory_cli/assets/default"
        out_dir: str = "../anystory_cli/assets/judge"
        log_file: str = "../runs/judge.log"
        judge: JudgeConfig = JudgeConfig()

        @field_validator("judge", mode="before")
        @classmethod
        def _judge_config(cls, value):
            if isinstance(value, JudgeConfig):
                return value
            if not isinstance(value, dict):
                raise ValueError("expected a mapping of JudgeConfig fields")
            unknown = sorted(set(value) - {f.name for f in fields(JudgeConfig)})
            if unknown:
                raise ValueError(f"unknown key(s) {unknown}; expected some of "
                                 f"{sorted(f.name for f in fields(JudgeConfig))}")
            return JudgeConfig.from_dict(value)

        @model_validator(mode="after")
        def _scene_steps_within_steps(self):
            if self.scene_steps is not None and self.scene_steps > self.steps:
                raise ValueError(f"scene_steps ({self.scene_steps}) must not exceed steps ({self.steps})")
            return self

    return JudgeRecipe


def parse_recipe(data: Any, source: str = "recipe"):
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise InputError(f"{source}: a judge recipe is a mapping (see recipes/judge.yaml)")
    try:
        return _recipe_classes()(**data)
    except ValidationError as exc:
        from ..train.recipe_files import recipe_error

        raise recipe_error(exc, source) from None


def load_recipe(path: str | Path):
    """(recipe, the folder its relative paths refer to)."""
    from ..train.recipe_files import read_recipe_yaml

    path = Path(path)
    return parse_recipe(read_recipe_yaml(path), str(path)), path.resolve().parent


def run_progress(recipe, step: int, time_share: float = 0.0) -> float:
    """How far the run is, 0..1: by its steps, or by the share of its time budget spent when
    that is further along, so that a run that hits the time cap on a busy machine still ends
    with a decayed learning rate."""
    return min(1.0, max(time_share, step / recipe.steps))


def scene_progress(recipe, step: int, time_share: float = 0.0) -> float:
    """SceneNet trains during the first scene_steps (it learns faster than CharacterNet), or
    until the time budget is spent. (Steps with SceneNet cost twice the others, so the share of
    time spent runs ahead of the share of steps early on: only the whole budget may end it.)"""
    return min(1.0, max(time_share, step / (recipe.scene_steps or recipe.steps)))


def learning_rate(recipe, step: int, progress: float) -> float:
    """Linear warm-up, then cosine over `progress` (0..1) to lr * min_lr_ratio. Its own law, not a
    step scheduler's: `progress` follows the time budget where that runs ahead of the steps."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = min(1.0, progress)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batch(pool: Pool, recipe, generator: torch.Generator) -> dict:
    """One augmented training batch: images with scene and locator targets, and character crops."""
    size = pool.images.shape[1]
    index = torch.randint(len(pool), (recipe.batch_size,), generator=generator).numpy()
    use_vae = (index < len(pool.vae_images)) & (
        torch.rand(recipe.batch_size, generator=generator).numpy() < recipe.vae_probability)
    images = pool.images[index]
    if use_vae.any():
        images[use_vae] = pool.vae_images[index[use_vae]]
    boxes, counts = pool.boxes[index].copy(), pool.count[index]
    foreground = pool.foreground[index].astype(np.float32)
    flip = torch.rand(recipe.batch_size, generator=generator).numpy() < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    foreground = np.where(flip[:, None, None], foreground[:, :, ::-1], foreground)
    boxes = np.where(flip[:, None, None], flip_boxes(boxes, size), boxes)
    pixels = augment(to_pixels(images, size), generator)
    batch = {
        "pixels": pixels, "place": torch.from_numpy(pool.place[index]), "time": torch.from_numpy(pool.time[index]),
        "prop": torch.from_numpy(pool.prop[index]), "count": torch.from_numpy(counts),
        "foreground": torch.from_numpy(np.ascontiguousarray(foreground)),
        "locator": locator_targets(boxes, counts, size),
    }
    # Character crops from the same augmented images, around jittered true boxes: of square scenes
    # only, unless the recipe says otherwise (a squashed character's pattern and proportions are
    # not its own, and learning them too cost the square's attribute accuracy).
    owners = [(b, i) for b in range(recipe.batch_size) for i in range(counts[b])
              if recipe.crops_from_other_shapes or int(index[b]) not in pool.native]
    if owners:
        pick = torch.randperm(len(owners), generator=generator)[: recipe.crops_per_step].tolist()
        chosen = [owners[p] for p in pick]
        crop_boxes = torch.tensor(np.array([boxes[b, i] for b, i in chosen]), dtype=torch.float32)
        side = torch.maximum(crop_boxes[:, 2] - crop_boxes[:, 0], crop_boxes[:, 3] - crop_boxes[:, 1])
        shift = (torch.rand(len(chosen), 2, generator=generator) * 2 - 1) * recipe.box_jitter * side[:, None]
        scale = 1 + (torch.rand(len(chosen), 1, generator=generator) * 2 - 1) * recipe.box_jitter
        centre = (crop_boxes[:, :2] + crop_boxes[:, 2:]) / 2 + shift
        half = (crop_boxes[:, 2:] - crop_boxes[:, :2]) / 2 * scale
        jittered = torch.cat([centre - half, centre + half], 1)
        owner_index = torch.tensor([b for b, _ in chosen])
        batch["crops"] = crop_characters(pixels, jittered, owner_index, recipe.judge.crop_size, recipe.judge.crop_margin)
        batch["attributes"] = torch.from_numpy(np.array([pool.attributes[index[b], i] for b, i in chosen]))
        batch["pose"] = torch.from_numpy(np.array([pool.pose[index[b], i] for b, i in chosen]))
    return batch


def heldout_report(judge: Judge, pool: Pool, images: np.ndarray) -> dict:
    """The judge's accuracies on `images` (the pool's, or their VAE round trips) against the pool's
    ground truth: scene heads, count, positions, poses, box recall (IoU >= 0.5), attributes read
    from the true boxes, and every attribute right at once, from true and from located boxes."""
    verdicts = judge.read_scenes(images)
    size = images.shape[1]
    records, ious = [], []
    true_boxes = [[pool.boxes[k, i].tolist() for i in range(pool.count[k])] for k in range(len(pool))]
    from_truth = judge.read_characters(images, true_boxes)
    from_located = judge.read_characters(images, [[c.box for c in v.characters] for v in verdicts])
    attribute_hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTE_CLASSES}
    all_truth, all_located = [], []
    for k, verdict in enumerate(verdicts):
        count = int(pool.count[k])
        centres = [(b[0] + b[2]) / 2 for b in true_boxes[k]]
        truth = SceneTruth(
            place=PLACES[pool.place[k]], time=TIMES[pool.time[k]], prop=PROPS[pool.prop[k]], count=count,
            positions=tuple(position_words(centres, size)) if count else (),
            poses=tuple(POSES[p] for p in pool.pose[k, :count]), boxes=(), identity_seeds=(),
        )
        records.append(score_scene(verdict, truth, [c.pose for c in from_located[k]]))
        for i in range(count):
            expected = pool.attributes[k, i]
            got = [from_truth[k][i].attributes[name] for name in ATTRIBUTE_CLASSES]
            for a, name in enumerate(ATTRIBUTE_CLASSES):
                attribute_hits[name].append(bool(got[a] == expected[a]))
            all_truth.append(bool(np.array_equal(got, expected)))
            located_ok = verdict.count == count and np.array_equal(
                [from_located[k][i].attributes[name] for name in ATTRIBUTE_CLASSES], expected)
            all_located.append(bool(located_ok))
            ious.append(max((_iou(true_boxes[k][i], c.box) for c in verdict.characters), default=0.0))
    report = summarise(records)
    report["box_recall_iou50"] = rounded_mean([iou >= 0.5 for iou in ious])
    report["mean_iou"] = rounded_mean(ious)
    report["attributes"] = {name: rounded_mean(hits) for name, hits in attribute_hits.items()}
    report["attributes_mean"] = rounded_mean([v for v in report["attributes"].values()])
    report["identity_all_attributes_true_boxes"] = rounded_mean(all_truth)
    report["identity_all_attributes_located"] = rounded_mean(all_located)
    report["scenes"], report["characters"] = len(pool), int(pool.count.sum())
    return report


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def train_judge(recipe, base_dir: str | Path = ".", log: Callable[[dict], None] | None = None,
                publish: bool = True, vae=None) -> tuple[Judge, dict]:
    """Render the pools, train both networks, measure them on held-out scenes, publish.

    `vae`: the VAE for the round trips (default: the shipped one in `recipe.vae_dir`)."""
    base_dir = Path(base_dir)
    torch.set_num_threads(recipe.threads)
    started = time.monotonic()
    log_path = (base_dir / recipe.log_file).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def emit(record: dict) -> None:
        record = {"minutes": round((time.monotonic() - started) / 60, 2), **record}
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        (log or (lambda r: print(json.dumps(r), flush=True)))(record)

    emit({"event": "start", "recipe": recipe.model_dump(mode="json")})
    pool = render_pool(recipe.pool_scenes, "train", recipe.seed, recipe.empty_share,
                       shapes=recipe.other_shapes, shape_share=recipe.other_shape_share)
    heldout = render_pool(recipe.heldout_scenes, "heldout", recipe.seed, 0.0, salt="judge-heldout")
    heldout_shapes = {f"{h}x{w}": render_pool(max(1, recipe.heldout_scenes // 2), "heldout", recipe.seed, 0.0,
                                              salt=f"judge-heldout-{h}x{w}", shapes=[(h, w)], shape_share=1.0)
                      for h, w in recipe.other_shapes}
    emit({"event": "rendered", "train_scenes": len(pool), "heldout_scenes": len(heldout),
          "other_shapes": len(pool.native)})
    if vae is None:
        from ..default_model import load_vae

        vae = load_vae((base_dir / recipe.vae_dir).resolve())
    pool.vae_images = pool_round_trip(vae, pool, min(recipe.vae_scenes, len(pool)))
    for held in (heldout, *heldout_shapes.values()):
        held.vae_images = pool_round_trip(vae, held, len(held))
    emit({"event": "vae", "train_scenes": len(pool.vae_images), "heldout_scenes": len(heldout.vae_images)})

    torch.manual_seed(recipe.seed)
    judge = Judge(recipe.judge)
    optimizer = torch.optim.AdamW([{"params": judge.scene_net.parameters()},
                                   {"params": judge.character_net.parameters()}],
                                  lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    step = 0
    train_started = time.monotonic()
    # What is left of max_minutes, less a minute for the held-out report.
    budget = max(1.0, recipe.max_minutes * 60 - (train_started - started) - 60)

    def time_share() -> float:
        return (time.monotonic() - train_started) / budget

    while step < recipe.steps and time_share() < 1.0:
        judge.train()
        share = time_share()
        train_scene = scene_progress(recipe, step, share) < 1.0
        optimizer.param_groups[0]["lr"] = learning_rate(recipe, step, scene_progress(recipe, step, share))
        optimizer.param_groups[1]["lr"] = learning_rate(recipe, step, run_progress(recipe, step, share))
        tick = time.perf_counter()
        batch = make_batch(pool, recipe, generator)
        loss, parts = torch.zeros(()), {}
        if train_scene:
            loss, parts = scene_loss(judge.scene_net(batch["pixels"]), batch)
        if "crops" in batch:
            char_loss, char_parts = character_loss(judge.character_net(batch["crops"]), batch["attributes"], batch["pose"])
            loss, parts = loss + char_loss, {**parts, **char_parts}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for net in (judge.scene_net, judge.character_net):  # each its own clip: neither scales the other
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], recipe.grad_clip)
        optimizer.step()
        step += 1
        for key, value in {"loss": loss.item(), "seconds": time.perf_counter() - tick,
                           **{k: v.item() for k, v in parts.items()}}.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
        if step % recipe.log_every == 0 or step == recipe.steps:
            emit({"step": step, "lr_scene": round(optimizer.param_groups[0]["lr"], 6) if train_scene else 0.0,
                  "lr_character": round(optimizer.param_groups[1]["lr"], 6),
                  **{k: round(v / counts[k], 4) for k, v in sums.items()}})
            sums, counts = {}, {}
    train_minutes = (time.monotonic() - train_started) / 60
    judge.eval()
    info = {
        "format": WEIGHTS_FORMAT,
        "classes": {name: list(classes) for name, classes in {**SCENE_HEADS, **CHARACTER_HEADS}.items()},
        "training": {"steps": step, "steps_planned": recipe.steps, "train_minutes": round(train_minutes, 2),
                     "threads": recipe.threads, "train_scenes": len(pool), "vae_scenes": len(pool.vae_images),
                     "identities": "train", "recipe": recipe.model_dump(mode="json")},
        "heldout": {
            "what": f"{len(heldout)} rendered scenes with held-out identities and unseen scene seeds",
            "rendered": heldout_report(judge, heldout, heldout.images),
            "vae_round_trip": heldout_report(judge, heldout, heldout.vae_images),
        },
    }
    if heldout_shapes:  # panels of other shapes, squashed into the square as evaluate reads them
        info["heldout_shapes"] = {
            name: {"scenes": len(held), "rendered": heldout_report(judge, held, held.images),
                   "vae_round_trip": heldout_report(judge, held, held.vae_images)}
            for name, held in heldout_shapes.items()}
    info["training"]["total_minutes"] = round((time.monotonic() - started) / 60, 2)
    judge.info = info
    emit({"event": "heldout", **info["heldout"], **({"shapes": info["heldout_shapes"]} if heldout_shapes else {})})
    if publish:
        path = save_judge(judge, (base_dir / recipe.out_dir).resolve(), info)
        emit({"event": "published", "path": str(path), "bytes": path.stat().st_size})
    return judge, info

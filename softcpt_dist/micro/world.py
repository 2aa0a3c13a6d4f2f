"""The micro world: generated pictures of objects with seven independent attributes, and their captions.

A scene is one to three identical objects (shape, colour, size) standing together in the left, middle
or right third of a textured background (colour, pattern). Nuisances: rotation, placement, size and
colour jitter, pattern period/phase/orientation, pixel noise. A batch renders in a few tensor operations
(128 scenes in tens of milliseconds), so pre-training draws fresh scenes every step; rendering uses only
exact arithmetic, so every CPU draws the same pixels.

A quarter of the (shape, colour, background) combinations never occur in pre-training (``held_out``;
every pair of values does). Test images of the few-shot group are drawn from those combinations only,
so zero-shot transfer there is to scenes never seen as a whole, as with real CLIP on new images.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

WORLD_VERSION = 2  # bump when rendering or captions change: cached micro CLIPs and groups are then stale

# Attribute -> values; the values are the words captions use and the few-shot classes' names.
ATTRIBUTES: Dict[str, tuple] = {
    "shape": ("circle", "square", "triangle", "cross", "star", "ring"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "size": ("small", "medium", "large"),
    "count": ("one", "two", "three"),
    "position": ("left", "middle", "right"),
    "background": ("black", "grey", "white", "brown"),
    "pattern": ("plain", "striped", "checkered", "dotted"),
}
RGB = {"red": (215, 35, 35), "green": (35, 165, 50), "blue": (40, 70, 225), "yellow": (235, 215, 30),
       "purple": (145, 45, 175), "orange": (240, 130, 20), "black": (25, 25, 25), "grey": (128, 128, 128),
       "white": (235, 235, 235), "brown": (120, 75, 40)}
_RADIUS = {"small": (4.6, 5.6), "medium": (7.0, 8.2), "large": (9.6, 11.0)}  # pixels at 64 x 64


def held_out(scene: Dict[str, int]) -> bool:
    """Whether pre-training never shows this scene's (shape, colour, background) combination (value indices)."""
    return (scene["shape"] + scene["colour"] + scene["background"]) % 4 == 0


def sample_scene(rng: random.Random, novel: bool = False, fixed: Dict[str, int] | None = None) -> Dict[str, int]:
    """Attribute value indices of one scene: a combination pre-training shows (``novel=False``: pre-training,
    few-shot training and validation) or one it holds out (``novel=True``: test); ``fixed`` pins attributes."""
    for _ in range(10_000):
        scene = {a: rng.randrange(len(v)) for a, v in ATTRIBUTES.items()}
        scene.update(fixed or {})
        if held_out(scene) == novel:
            return scene
    raise ValueError(f"no {'novel' if novel else 'seen'} scene has {fixed}")


@dataclass(frozen=True)
class Camera:
    """How a set of images is taken: pre-training uses the identity camera; the few-shot group's camera
    differs (zoomed in, a colour cast), a consistent shift of the kind benchmark images show against web
    images, which zero-shot prompts cannot know and a few labelled shots reveal."""

    zoom: float = 1.0  # factor on object radii and pattern periods
    colour_gain: tuple = (1.0, 1.0, 1.0)  # per RGB channel, on the finished picture

    def __post_init__(self):
        if self.zoom <= 0 or len(self.colour_gain) != 3 or min(self.colour_gain) <= 0:
            raise ValueError(f"a camera needs zoom > 0 and three positive colour gains, not {self}")


PRETRAINING_CAMERA = Camera()


@dataclass
class _Layout:
    """Per-scene random nuisances, drawn once per scene from its generator."""

    centres: List[tuple]
    radius: float
    angle: float
    fill: tuple
    shade: tuple
    period: float
    phase: float
    orientation: int


def _layout(rng: random.Random, scene: Dict[str, int], size: int, zoom: float) -> _Layout:
    k = scene["count"] + 1
    r = rng.uniform(*_RADIUS[ATTRIBUTES["size"][scene["size"]]]) * size / 64 * zoom
    third = size / 3
    x0 = third * scene["position"]
    slot = size / k  # the objects stand one above the other, each in its own slot
    centres = []
    for i in range(k):
        dx = max(0.0, third / 2 - r) * 0.8
        dy = max(0.0, slot / 2 - r) * 0.8
        centres.append((x0 + third / 2 + rng.uniform(-dx, dx), slot * (i + 0.5) + rng.uniform(-dy, dy)))
    colour = RGB[ATTRIBUTES["colour"][scene["colour"]]]
    fill = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in colour)
    bg = RGB[ATTRIBUTES["background"][scene["background"]]]
    delta = rng.randint(35, 55) * (1 if sum(bg) < 380 else -1)
    base = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in bg)
    shade = tuple(min(255, max(0, c + delta)) for c in base)
    return _Layout(centres, r, rng.uniform(0, 2 * math.pi), fill, (base, shade),
                   rng.uniform(5.0, 8.0) * size / 64 * zoom, rng.uniform(0, 1), rng.randrange(3))


def _pattern_masks(lays: List[_Layout], patterns: List[str], yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]``: 1 where each scene's background takes its second shade."""
    period = torch.tensor([lay.period for lay in lays], dtype=torch.float32).view(-1, 1, 1)
    phase = torch.tensor([lay.phase for lay in lays], dtype=torch.float32).view(-1, 1, 1)
    u, v = torch.broadcast_tensors(xx / period + phase, yy / period + phase)  # [B, S, S] in pattern cells
    mask = torch.zeros(u.shape)
    for name in ("striped", "checkered", "dotted"):
        rows = torch.tensor([i for i, p in enumerate(patterns) if p == name], dtype=torch.long)
        if len(rows) == 0:
            continue
        ur, vr = u[rows], v[rows]
        if name == "striped":  # along x, y or the diagonal
            orient = torch.tensor([lays[i].orientation for i in rows.tolist()]).view(-1, 1, 1)
            coord = torch.where(orient == 0, vr, torch.where(orient == 1, ur, (ur + vr) / math.sqrt(2)))
            mask[rows] = ((coord % 1.0) < 0.5).float()
        elif name == "checkered":
            mask[rows] = ((torch.floor(ur) + torch.floor(vr)) % 2).float()
        else:  # a dot in every cell of a grid
            du, dv = ur % 1.0 - 0.5, vr % 1.0 - 0.5
            mask[rows] = ((du * du + dv * dv) < 0.06).float()
    return mask


def _shape_distance(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii, negative inside) to a shape of radius 1 at the origin. Only IEEE-exact
    operations (no transcendental functions of tensors): the same pixels on every CPU and batch size."""
    rho = torch.sqrt(u * u + v * v)
    if name == "circle":
        return rho - 1.0
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.82
    if name == "triangle":
        d = None
        for k in range(3):  # three half-planes of an equilateral triangle
            a = math.pi / 2 + k * 2 * math.pi / 3
            side = u * math.cos(a) + v * math.sin(a) - 0.55
            d = side if d is None else torch.maximum(d, side)
        return d
    if name == "cross":
        arm = 0.34
        bar_h = torch.maximum(u.abs() - 1.0, v.abs() - arm)
        bar_v = torch.maximum(v.abs() - 1.0, u.abs() - arm)
        return torch.minimum(bar_h, bar_v)
    if name == "star":  # five points: cos(5 phi) as the Chebyshev polynomial T5 of cos(phi) = u / rho
        c = torch.where(rho > 0, u / rho.clamp_min(1e-12), torch.ones_like(u))
        cos5 = ((16 * c * c - 20) * c * c + 5) * c
        return rho - (0.45 + 0.6 * ((1 + cos5) / 2) ** 2)
    if name == "ring":
        return (rho - 0.78).abs() - 0.24
    raise ValueError(f"unknown shape {name!r}")


def _object_alpha(lays: List[_Layout], shapes: List[str], slot: int, yy: torch.Tensor,
                  xx: torch.Tensor) -> torch.Tensor:
    """``[n, S, S]`` coverage of the ``slot``-th object of each given scene (a one-pixel anti-aliased edge)."""
    cx = torch.tensor([lay.centres[slot][0] for lay in lays], dtype=torch.float32).view(-1, 1, 1)
    cy = torch.tensor([lay.centres[slot][1] for lay in lays], dtype=torch.float32).view(-1, 1, 1)
    radius = torch.tensor([lay.radius for lay in lays], dtype=torch.float32).view(-1, 1, 1)
    cos = torch.tensor([math.cos(lay.angle) for lay in lays], dtype=torch.float32).view(-1, 1, 1)
    sin = torch.tensor([math.sin(lay.angle) for lay in lays], dtype=torch.float32).view(-1, 1, 1)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    alpha = torch.empty(u.shape)
    for name in set(shapes):
        rows = torch.tensor([i for i, s in enumerate(shapes) if s == name], dtype=torch.long)
        alpha[rows] = (0.5 - _shape_distance(name, u[rows], v[rows]) * radius[rows]).clamp(0, 1)
    return alpha


def render_batch(scenes: Sequence[Dict[str, int]], seeds: Sequence, size: int = 64,
                 camera: Camera = PRETRAINING_CAMERA) -> torch.Tensor:
    """``[B, 3, size, size]`` uint8; each image deterministic in its ``seed`` (any hashable) alone, and the
    same on every CPU kind, thread count and batch size (exact arithmetic and integer noise only)."""
    rngs = [random.Random(str(seed)) for seed in seeds]
    lays = [_layout(rng, scene, size, camera.zoom) for rng, scene in zip(rngs, scenes)]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    base = torch.tensor([lay.shade[0] for lay in lays], dtype=torch.float32).view(-1, 3, 1, 1)
    shade = torch.tensor([lay.shade[1] for lay in lays], dtype=torch.float32).view(-1, 3, 1, 1)
    second = _pattern_masks(lays, [ATTRIBUTES["pattern"][s["pattern"]] for s in scenes], yy, xx).unsqueeze(1)
    img = base * (1 - second) + shade * second
    shapes = [ATTRIBUTES["shape"][s["shape"]] for s in scenes]
    fill = torch.tensor([lay.fill for lay in lays], dtype=torch.float32).view(-1, 3, 1, 1)
    for slot in range(max(len(lay.centres) for lay in lays)):
        rows = [i for i, lay in enumerate(lays) if len(lay.centres) > slot]
        alpha = _object_alpha([lays[i] for i in rows], [shapes[i] for i in rows], slot, yy, xx).unsqueeze(1)
        index = torch.tensor(rows, dtype=torch.long)
        img[index] = img[index] * (1 - alpha) + fill[index] * alpha
    if camera.colour_gain != PRETRAINING_CAMERA.colour_gain:
        img = img * torch.tensor(camera.colour_gain, dtype=torch.float32).view(1, 3, 1, 1)
    # Pixel noise: the sum of two uniform integers in [-7, 7] (std 6.1), hashed from each image's own seed.
    noise = _pixel_noise([rng.getrandbits(62) for rng in rngs], img.shape[1:])
    return (img.round() + noise).clamp(0, 255).to(torch.uint8)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors, every product below 2**63: exact on every CPU)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


_NOISE_BANK = 1 << 20  # values in the pixel-noise table


@functools.lru_cache(maxsize=1)
def _noise_bank() -> torch.Tensor:
    """2**20 noise values, each the sum of two uniform integers in [-7, 7] (std 6.1), made by an integer hash."""
    bits = _mix32(torch.arange(_NOISE_BANK, dtype=torch.int64) * 0x9E3779B9 & 0xFFFFFFFF)
    low, high = ((bits & 0xFFFF) * 15) >> 16, ((bits >> 16) * 15) >> 16  # two uniform draws in 0..14
    return (low + high - 14).float()


def _pixel_noise(seeds: List[int], shape) -> torch.Tensor:
    """``[B, *shape]`` integer-valued noise, each image's a window of the bank at an offset its seed picks."""
    count = math.prod(shape)
    offsets = torch.tensor([s % (_NOISE_BANK - count) for s in seeds], dtype=torch.int64).view(-1, 1)
    return _noise_bank()[offsets + torch.arange(count)].view(len(seeds), *shape)


def render(scene: Dict[str, int], seed, size: int = 64, camera: Camera = PRETRAINING_CAMERA) -> torch.Tensor:
    """One scene as a ``[3, size, size]`` uint8 image; deterministic in ``seed`` (any hashable)."""
    return render_batch([scene], [seed], size, camera)[0]


# --- captions -------------------------------------------------------------------------------------------

_POSITION = {"left": ("on the left", "at the left", "on the left side"),
             "middle": ("in the middle", "at the middle", "in the centre"),
             "right": ("on the right", "at the right", "on the right side")}
_TEMPLATES = ("a photo of {obj}{where}{bg}.", "{obj}{where}{bg}.", "an image of {obj}{where}{bg}.",
              "a picture showing {obj}{bg}{where}.", "a rendering of {obj}{where}{bg}.",
              "there {be} {obj}{where}{bg}.", "a photo of {obj}{bg}{where}.")
# How often a caption names each attribute (independently; at least one is named). The spatial attributes
# are named most: a small CLIP pre-trained for a few hundred steps learns them last, and captions that
# seldom name them leave position at chance. Shape is never named: it varies as a nuisance only.
MENTION = {"shape": 0.0, "colour": 0.57, "size": 0.85, "count": 0.85, "position": 0.85, "background": 0.57,
           "pattern": 0.57}
_NOUNS = ("object", "shape", "thing")


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def caption(scene: Dict[str, int], rng: random.Random, said: Optional[Sequence[str]] = None) -> str:
    """A caption naming the attributes ``said``, by default each with its ``MENTION`` probability."""
    words = {a: ATTRIBUTES[a][i] for a, i in scene.items()}
    if said is None:
        named = [a for a, p in MENTION.items() if p > 0]
        said = [a for a in named if rng.random() < MENTION[a]] or [rng.choice(named)]
    many = words["count"] != "one"
    noun = words["shape"] if "shape" in said else rng.choice(_NOUNS)
    noun = _plural(noun) if many else noun
    adjectives = " ".join(words[a] for a in ("size", "colour") if a in said)
    if "count" in said:
        head = rng.choice(("one", "a single")) if not many else words["count"]
    else:
        head = "some" if many else ("an" if (adjectives or noun)[0] in "aeiou" else "a")
    obj = " ".join(w for w in (head, adjectives, noun) if w)
    where = " " + rng.choice(_POSITION[words["position"]]) if "position" in said else ""
    bg_words = " ".join(words[a] for a in ("pattern", "background") if a in said)
    bg = f" on a {bg_words} background" if bg_words else ""
    return rng.choice(_TEMPLATES).format(obj=obj, where=where, bg=bg, be="are" if many else "is")


def vocabulary() -> str:
    """Every word a caption can use, once each (pre-training trains only these rows of the token embedding)."""
    words = set()
    for text in (*_TEMPLATES, *(p for ps in _POSITION.values() for p in ps), *_NOUNS, "one a single some an a on background is are"):
        words.update(text.replace("{", " {").replace("}", "} ").split())
    for values in ATTRIBUTES.values():
        words.update(values)
    words.update(_plural(n) for n in (*_NOUNS, *ATTRIBUTES["shape"]))
    return " ".join(sorted({w.strip(".") for w in words if "{" not in w} - {""}) + ["."])

"""The micro world: generated pictures of objects with seven independent attributes, and their captions.

A scene is one to three identical objects (shape, colour, size) standing together in the left, middle
or right third of a textured background (colour, pattern). Nuisances: rotation, placement, size and
colour jitter, pattern period/phase/orientation, pixel noise. Rendering is a few torch operations per
scene (a batch of 256 in well under a second), so pre-training draws fresh scenes every step.

A quarter of the (shape, colour, background) combinations never occur in pre-training (``held_out``;
every pair of values does). Test images of the few-shot group are drawn from those combinations only,
so zero-shot transfer there is to scenes never seen as a whole, as with real CLIP on new images.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

WORLD_VERSION = 1  # bump when rendering or captions change: cached micro CLIPs and groups are then stale

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


def _pattern_mask(name: str, lay: _Layout, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """1 where the background takes its second shade."""
    p = lay.period
    if name == "plain":
        return torch.zeros_like(xx)
    if name == "striped":
        coord = (yy, xx, (xx + yy) / math.sqrt(2))[lay.orientation]
        return (((coord / p + lay.phase) % 1.0) < 0.5).float()
    if name == "checkered":
        return ((torch.floor(xx / p + lay.phase) + torch.floor(yy / p + lay.phase)) % 2).float()
    # dotted: a dot in every cell of a grid
    u, v = (xx / p + lay.phase) % 1.0 - 0.5, (yy / p + lay.phase) % 1.0 - 0.5
    return ((u * u + v * v) < 0.06).float()


def _shape_distance(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii, negative inside) to a shape of radius 1 at the origin."""
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
    if name == "star":
        phi = torch.atan2(v, u)
        return rho - (0.45 + 0.6 * ((1 + torch.cos(5 * phi)) / 2) ** 2)
    if name == "ring":
        return (rho - 0.78).abs() - 0.24
    raise ValueError(f"unknown shape {name!r}")


def render(scene: Dict[str, int], seed, size: int = 64, camera: Camera = PRETRAINING_CAMERA) -> torch.Tensor:
    """One scene as a ``[3, size, size]`` uint8 image; deterministic in ``seed`` (any hashable)."""
    rng = random.Random(str(seed))
    lay = _layout(rng, scene, size, camera.zoom)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    base, shade = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in lay.shade)
    second = _pattern_mask(ATTRIBUTES["pattern"][scene["pattern"]], lay, yy, xx)
    img = base * (1 - second) + shade * second
    shape = ATTRIBUTES["shape"][scene["shape"]]
    cos, sin = math.cos(lay.angle), math.sin(lay.angle)
    fill = torch.tensor(lay.fill, dtype=torch.float32).view(3, 1, 1)
    for cx, cy in lay.centres:
        dx, dy = (xx - cx) / lay.radius, (yy - cy) / lay.radius
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        alpha = (0.5 - _shape_distance(shape, u, v) * lay.radius).clamp(0, 1)  # one-pixel anti-aliased edge
        img = img * (1 - alpha) + fill * alpha
    if camera.colour_gain != PRETRAINING_CAMERA.colour_gain:
        img = img * torch.tensor(camera.colour_gain, dtype=torch.float32).view(3, 1, 1)
    noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(rng.getrandbits(62))) * 6.0
    return (img + noise).round().clamp(0, 255).to(torch.uint8)


def render_batch(scenes: Sequence[Dict[str, int]], seeds: Sequence, size: int = 64) -> torch.Tensor:
    """``[B, 3, size, size]`` uint8."""
    return torch.stack([render(s, k, size) for s, k in zip(scenes, seeds)])


# --- captions -------------------------------------------------------------------------------------------

_POSITION = {"left": ("on the left", "at the left", "on the left side"),
             "middle": ("in the middle", "at the middle", "in the centre"),
             "right": ("on the right", "at the right", "on the right side")}
_TEMPLATES = ("a photo of {obj}{where}{bg}.", "{obj}{where}{bg}.", "an image of {obj}{where}{bg}.",
              "a picture showing {obj}{bg}{where}.", "a rendering of {obj}{where}{bg}.",
              "there {be} {obj}{where}{bg}.", "a photo of {obj}{bg}{where}.")
_NOUNS = ("object", "shape", "thing")


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def caption(scene: Dict[str, int], rng: random.Random) -> str:
    """A caption naming a random subset of the scene's attributes (1 to all 7, each size as likely: short
    captions are as common as full ones), in varied wording."""
    words = {a: ATTRIBUTES[a][i] for a, i in scene.items()}
    said = rng.sample(list(ATTRIBUTES), rng.randint(1, len(ATTRIBUTES)))
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
    template = rng.choice(_TEMPLATES)
    return template.format(obj=obj, where=where, bg=bg, be="are" if many else "is")

"""Procedural training data for difusi-mini: one or two flat shapes on a flat background, with captions.

Every sample is a pure function of ``(seed, index)``: the same pair always gives the same picture, the
same attributes and the same caption, on any machine, so training is reproducible and resumable without
storing a data set. Shapes are rendered with 4x4 supersampling (box-filter anti-aliasing) in numpy.

The caption describes a random subset of the true attributes through templates with synonyms and varied
word order; it never states anything false about the picture (tests check this by parsing captions back).
About 10 % of captions are empty so that the model also learns the unconditional distribution that
classifier-free guidance needs (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (250, 135, 20),
    "purple": (140, 40, 180),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Colours outside difusi-mini's vocabulary, drawn only by the LoRA data (``difusi.mini.lora``): the base data
# set, its captions and the classifier's palette never use them, so every base sample stays bit-identical.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (255, 105, 180)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SIZES: tuple[str, ...] = ("small", "big")

# Centre of each named position as a fraction of the image side (x, y); y grows downwards.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
# Half-extent of a shape (circle radius, half the square side) as a fraction of the image side.
SIZE_RADII: dict[str, float] = {"small": 0.10, "big": 0.19}
# Two-shape scenes use a pair of opposite positions so the shapes never overlap.
POSITION_PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "in the left"),
    "right": ("on the right", "at the right", "in the right"),
    "top": ("at the top", "on top", "in the top"),
    "bottom": ("at the bottom", "in the bottom", "on the bottom"),
    "center": ("in the center", "in the middle", "in the centre", "at the center"),
}

EMPTY_CAPTION_RATE = 0.10
TWO_SHAPE_RATE = 0.25
GENERIC_SHAPE_RATE = 0.15  # how often the shape noun is replaced by "shape", so "a shape" means "any shape"
COLOUR_JITTER = 12  # +- per channel, so the model and classifier see more than 8 exact RGB values
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One shape in a scene: what it is, its colour name, size name and position name."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A whole picture: a background colour name and one or two shapes."""

    background: str
    shapes: tuple[ShapeSpec, ...]


@dataclass(frozen=True)
class Sample:
    """One training example: the rendered image (H, W, 3 uint8), its scene and its caption."""

    image: np.ndarray
    scene: Scene
    caption: str
    mentioned: dict = field(default_factory=dict)


def sample_rng(seed: int, index: int) -> random.Random:
    """The random stream of sample ``index`` of data set ``seed``, independent of every other sample."""
    return random.Random(f"difusi-mini:{seed}:{index}")


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene: background, then one shape (anywhere) or two shapes (a left/right or top/bottom pair)."""
    background = rng.choice(COLOUR_NAMES)
    shape_colours = [c for c in COLOUR_NAMES if c != background]
    if rng.random() < TWO_SHAPE_RATE:
        positions = rng.choice(POSITION_PAIRS)
        shapes = tuple(
            ShapeSpec(rng.choice(SHAPES), rng.choice(shape_colours), "small", position) for position in positions
        )
    else:
        shapes = (ShapeSpec(rng.choice(SHAPES), rng.choice(shape_colours), rng.choice(SIZES), rng.choice(POSITIONS)),)
    return Scene(background, shapes)


def _jittered(colour: str, rng: random.Random) -> np.ndarray:
    base = np.array(COLOURS[colour] if colour in COLOURS else EXTRA_COLOURS[colour], dtype=np.float32)
    jitter = np.array([rng.uniform(-COLOUR_JITTER, COLOUR_JITTER) for _ in range(3)], dtype=np.float32)
    return np.clip(base + jitter, 0, 255)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of a ``size`` x ``size`` image by the shape (anti-aliased).

    Coordinates are in pixels. The triangle points up and has the same bounding box as the square, so
    "big" and "small" mean the same extent for every shape. Only the shape's bounding box is supersampled.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    coverage = np.zeros((size, size), dtype=np.float32)
    x0, x1 = max(0, int(cx - radius) - 1), min(size, int(cx + radius) + 2)
    y0, y1 = max(0, int(cy - radius) - 1), min(size, int(cy + radius) + 2)
    if x1 <= x0 or y1 <= y0:
        return coverage
    xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE - cx
    ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE - cy
    dy, dx = np.meshgrid(ys, xs, indexing="ij")
    if shape == "circle":
        inside = dx * dx + dy * dy <= radius * radius
    elif shape == "square":
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    else:
        # Apex at (0, -r), base from (-r, r) to (r, r): inside when above the base and below both slanted edges.
        inside = (dy <= radius) & (2 * np.abs(dx) <= dy + radius)
    block = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    coverage[y0:y1, x0:x1] = block
    return coverage


def render_scene(scene: Scene, size: int, rng: random.Random) -> np.ndarray:
    """Paint the scene into an (size, size, 3) uint8 image; small jitter of centres, radii and colours."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = _jittered(scene.background, rng)
    for spec in scene.shapes:
        fx, fy = POSITION_CENTRES[spec.position]
        cx = (fx + rng.uniform(-0.04, 0.04)) * size
        cy = (fy + rng.uniform(-0.04, 0.04)) * size
        radius = SIZE_RADII[spec.size] * rng.uniform(0.9, 1.1) * size
        coverage = shape_mask(spec.shape, cx, cy, radius, size)[..., None]
        image = image * (1 - coverage) + _jittered(spec.colour, rng) * coverage
    return np.round(image).astype(np.uint8)


def _describe_shape(spec: ShapeSpec, rng: random.Random, keep: dict[str, bool]) -> str:
    words = []
    if keep["size"]:
        words.append(rng.choice(SIZE_SYNONYMS[spec.size]))
    if keep["colour"]:
        words.append(spec.colour)
    words.append(rng.choice(SHAPE_SYNONYMS[spec.shape]) if keep["shape"] else "shape")
    phrase = "a " + " ".join(words)
    if keep["position"]:
        phrase += " " + rng.choice(POSITION_PHRASES[spec.position])
    return phrase


def _background_suffix(background: str, rng: random.Random) -> str:
    return rng.choice((f"on a {background} background", f"with a {background} background", f"on {background}"))


def _background_prefix(background: str, rng: random.Random) -> str:
    return rng.choice((f"{background} background,", f"a {background} background with"))


POSITION_RATE = 0.7  # how often a single shape's caption names its position (two shapes: 0.5 each)


def caption_scene(scene: Scene, rng: random.Random, position_rate: float = POSITION_RATE) -> tuple[str, dict]:
    """A templated caption telling the truth about a random subset of the scene's attributes.

    ``position_rate`` is how often a single shape's position is named (two shapes: 5/7 of it each), so a
    training phase can emphasise layout words. Returns the caption and which attributes it mentions
    (``{"background": bool, "shapes": [keep dicts]}``).
    """
    if rng.random() < EMPTY_CAPTION_RATE:
        return "", {"background": False, "shapes": []}
    single = len(scene.shapes) == 1
    keeps = []
    for _ in scene.shapes:
        keeps.append(
            {
                "colour": rng.random() < 0.85,
                "shape": rng.random() >= GENERIC_SHAPE_RATE,
                "size": single and rng.random() < 0.6,
                "position": rng.random() < (position_rate if single else position_rate * 5 / 7),
            }
        )
    with_background = rng.random() < 0.75
    phrases = [_describe_shape(spec, rng, keep) for spec, keep in zip(scene.shapes, keeps, strict=True)]
    shapes_text = " and ".join(phrases)
    if not with_background:
        caption = shapes_text
    else:
        if rng.random() < 0.7:
            caption = f"{shapes_text} {_background_suffix(scene.background, rng)}"
        else:
            caption = f"{_background_prefix(scene.background, rng)} {shapes_text}"
    if single and rng.random() < 0.1 and keeps[0]["colour"]:
        # Very short captions ("red", "red circle") teach single words, which negative prompts rely on.
        caption = scene.shapes[0].colour + ("" if rng.random() < 0.5 else " " + scene.shapes[0].shape)
        keeps = [{"colour": True, "shape": caption.endswith(scene.shapes[0].shape), "size": False, "position": False}]
        with_background = False
    return caption, {"background": with_background, "shapes": keeps}


def make_sample(seed: int, index: int, size: int = 64, position_rate: float = POSITION_RATE) -> Sample:
    """Sample ``index`` of data set ``seed`` at ``size`` x ``size`` pixels (deterministic)."""
    rng = sample_rng(seed, index)
    scene = random_scene(rng)
    image = render_scene(scene, size, rng)
    caption, mentioned = caption_scene(scene, rng, position_rate)
    return Sample(image, scene, caption, mentioned)


def make_batch(
    seed: int, start: int, count: int, size: int = 64, position_rate: float = POSITION_RATE
) -> tuple[np.ndarray, list[str]]:
    """Samples ``start .. start+count-1``: images as (count, size, size, 3) uint8 and their captions."""
    samples = [make_sample(seed, start + i, size, position_rate) for i in range(count)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


def stated_position(caption: str) -> str | None:
    """The one position a caption names, or None when it names none or two (a two-shape caption)."""
    words = f" {caption} "
    named = {p for p, phrases in POSITION_PHRASES.items() if any(f" {phrase} " in words for phrase in phrases)}
    return named.pop() if len(named) == 1 else None


def describe(scene: Scene) -> str:
    """The canonical full caption of a single-shape scene, as used by the evaluation prompt set."""
    spec = scene.shapes[0]
    return f"a {spec.size} {spec.colour} {spec.shape} {POSITION_PHRASES[spec.position][0]} on a {scene.background} background"

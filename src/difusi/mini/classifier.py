"""Reading a picture back into attributes, for scoring prompt adherence.

Colours and position are measured exactly from pixels (no learned judge can be fooled into agreeing
with the generator): the background is the palette colour nearest the median of the image border, the
shape is every pixel far from that background colour, its colour is the palette colour nearest the
median of its pixels and its position the named centre nearest its centroid.

Shape identity is judged by a small CNN trained on the same procedural data, looking only at the
shape's silhouette (its foreground mask cropped to a square around the bounding box and resized to
16x16), so its answer cannot depend on colours or position. Training is deterministic and takes
seconds on a CPU, so it is trained on demand instead of shipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from difusi.mini import data

BORDER = 3  # pixels of the image edge read as background
FOREGROUND_DISTANCE = 45.0  # RGB distance from the background; about half the closest palette pair (orange/yellow)
MIN_FOREGROUND_PIXELS = 6
SILHOUETTE = 16
_PALETTE = np.array([data.COLOURS[c] for c in data.COLOUR_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Observation:
    """What the pixels show: colour names, position name, shape name (None where nothing was found)."""

    background: str
    colour: str | None
    position: str | None
    shape: str | None
    size: str | None
    foreground_fraction: float


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour nearest (Euclidean RGB) to ``rgb``."""
    return data.COLOUR_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def background_colour(image: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, median RGB) of the image border, which no shape of the data set reaches."""
    border = np.concatenate(
        [
            image[:BORDER].reshape(-1, 3),
            image[-BORDER:].reshape(-1, 3),
            image[:, :BORDER].reshape(-1, 3),
            image[:, -BORDER:].reshape(-1, 3),
        ]
    ).astype(np.float32)
    median = np.median(border, axis=0)
    return nearest_colour(median), median


def foreground_mask(image: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of pixels far from the background colour."""
    distance = np.sqrt(((image.astype(np.float32) - background_rgb) ** 2).sum(axis=-1))
    return distance > FOREGROUND_DISTANCE


def _core(mask: np.ndarray) -> np.ndarray:
    # Pixels whose 4 neighbours are foreground too: drops anti-aliased edges that mix two colours.
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    return core if core.sum() >= MIN_FOREGROUND_PIXELS else mask


def nearest_position(mask: np.ndarray) -> str:
    """Named position whose centre is nearest the mask's centroid."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    return min(data.POSITION_CENTRES, key=lambda p: (data.POSITION_CENTRES[p][0] - cx) ** 2 + (data.POSITION_CENTRES[p][1] - cy) ** 2)


def size_name(mask: np.ndarray) -> str:
    """"small" or "big" from the bounding-box extent (threshold halfway between the two nominal sizes)."""
    ys, xs = np.nonzero(mask)
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / mask.shape[0]
    threshold = data.SIZE_RADII["small"] + data.SIZE_RADII["big"]  # mean diameter = sum of the two radii
    return "big" if extent > threshold else "small"


def silhouette(mask: np.ndarray) -> torch.Tensor:
    """The mask cropped to a square around its bounding box, resized to 16x16 (float, 1 channel)."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / 2 + 1
    size = mask.shape[0]
    padded = np.zeros((3 * size, 3 * size), dtype=np.float32)
    padded[size : 2 * size, size : 2 * size] = mask
    y0, y1 = int(round(cy - half)) + size, int(round(cy + half)) + size
    x0, x1 = int(round(cx - half)) + size, int(round(cx + half)) + size
    crop = torch.from_numpy(padded[y0:y1, x0:x1])[None, None]
    return F.interpolate(crop, size=(SILHOUETTE, SILHOUETTE), mode="area")[0]


class ShapeClassifier(torch.nn.Module):
    """Tiny CNN: 16x16 silhouette -> logits over ``data.SHAPES``."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Linear(32 * 4 * 4, len(data.SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _single_shape_silhouettes(seed: int, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = [], []
    index = 0
    while len(labels) < count:
        sample = data.make_sample(seed, index, size)
        index += 1
        if len(sample.scene.shapes) != 1:
            continue
        _, bg_rgb = background_colour(sample.image)
        mask = shape_pixels(sample.image, bg_rgb)
        if mask.sum() < MIN_FOREGROUND_PIXELS:
            continue
        inputs.append(silhouette(mask))
        labels.append(data.SHAPES.index(sample.scene.shapes[0].shape))
    return torch.stack(inputs), torch.tensor(labels)


@functools.lru_cache(maxsize=2)
def train_shape_classifier(seed: int = 1234, count: int = 3000, epochs: int = 8, size: int = 64) -> ShapeClassifier:
    """Train the silhouette classifier on procedural single-shape images (deterministic, a few seconds).

    Cached per process (same arguments, same weights). Gaussian noise is added to the silhouettes so that
    the slightly ragged outlines of generated images look like training data.
    """
    inputs, labels = _single_shape_silhouettes(seed, count, size)
    with torch.random.fork_rng():  # seeded initialisation without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = ShapeClassifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(64):
            x = inputs[batch]
            x = (x + 0.15 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
            loss = F.cross_entropy(model(x), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def classify_shape(model: ShapeClassifier, mask: np.ndarray) -> str:
    """Shape name the classifier sees in a foreground mask."""
    logits = model(silhouette(mask)[None])
    return data.SHAPES[int(logits.argmax())]


def shape_pixels(image: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of the main shape: far from the background, nearer the shape's colour than the
    background's, and the largest connected piece.

    The two-colour test drops the faint halos and colour fringes that generated images have around shapes
    (they are near the background colour); keeping the largest piece drops stray specks.
    """
    far = foreground_mask(image, background_rgb)
    if far.sum() < MIN_FOREGROUND_PIXELS:
        return far
    pixels = image.astype(np.float32)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=-1))
    # The shape's colour: median of the far pixels most unlike the background (the shape's interior).
    strongest = far & (distance >= np.quantile(distance[far], 0.5))
    shape_rgb = np.median(pixels[strongest], axis=0)
    nearer_shape = ((pixels - shape_rgb) ** 2).sum(axis=-1) < ((pixels - background_rgb) ** 2).sum(axis=-1)
    mask = far & nearer_shape
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def observe(image: np.ndarray, shape_model: ShapeClassifier | None) -> Observation:
    """Everything the scorer reads from an (H, W, 3) uint8 image."""
    background, background_rgb = background_colour(image)
    mask = shape_pixels(image, background_rgb)
    fraction = float(mask.mean())
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return Observation(background, None, None, None, None, fraction)
    colour = nearest_colour(np.median(image[_core(mask)].astype(np.float32), axis=0))
    shape = classify_shape(shape_model, mask) if shape_model is not None else None
    return Observation(background, colour, nearest_position(mask), shape, size_name(mask), fraction)

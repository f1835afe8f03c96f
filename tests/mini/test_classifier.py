"""The adherence scorer: exact pixel rules and the silhouette classifier, checked on held-out procedural images."""

from __future__ import annotations

import numpy as np
import pytest

from difusi.mini import classifier, data


@pytest.fixture(scope="module")
def shape_model() -> classifier.ShapeClassifier:
    return classifier.train_shape_classifier()


def _held_out(count: int) -> list[data.Sample]:
    samples, index = [], 0
    while len(samples) < count:
        sample = data.make_sample(4242, index)  # the classifier trains on seed 1234
        index += 1
        if len(sample.scene.shapes) == 1:
            samples.append(sample)
    return samples


def test_scorer_reads_held_out_procedural_images(shape_model):
    samples = _held_out(200)
    hits = dict.fromkeys(("background", "colour", "position", "shape", "size"), 0)
    for sample in samples:
        seen = classifier.observe(sample.image, shape_model)
        truth = sample.scene.shapes[0]
        hits["background"] += seen.background == sample.scene.background
        hits["colour"] += seen.colour == truth.colour
        hits["position"] += seen.position == truth.position
        hits["shape"] += seen.shape == truth.shape
        hits["size"] += seen.size == truth.size
    rates = {k: v / len(samples) for k, v in hits.items()}
    assert rates["background"] == 1.0 and rates["colour"] >= 0.99 and rates["position"] >= 0.99, rates
    assert rates["shape"] >= 0.97 and rates["size"] >= 0.97, rates


def test_shape_answer_ignores_colours(shape_model):
    for shape in data.SHAPES:
        answers = set()
        for background, colour in (("blue", "red"), ("white", "black"), ("purple", "yellow")):
            scene = data.Scene(background, (data.ShapeSpec(shape, colour, "big", "center"),))
            image = data.render_scene(scene, 64, data.sample_rng(0, 0))
            answers.add(classifier.observe(image, shape_model).shape)
        assert answers == {shape}


def test_empty_picture_has_no_shape():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:] = data.COLOURS["green"]
    seen = classifier.observe(image, None)
    assert seen.background == "green" and seen.colour is None and seen.position is None


@pytest.mark.parametrize("name", data.COLOUR_NAMES)
def test_nearest_colour_of_each_palette_entry_is_itself(name):
    assert classifier.nearest_colour(np.array(data.COLOURS[name], dtype=np.float32)) == name


def _degrade(image: np.ndarray, seed: int) -> np.ndarray:
    """What generated images look like: blurred edges, a faint halo around the shape, a stray speck, noise."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.2))).astype(np.float32)
    halo = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(4))).astype(np.float32)
    out = 0.8 * blurred + 0.2 * halo + rng.normal(0, 4, image.shape)
    y, x = rng.integers(8, 56, size=2)
    out[y : y + 2, x : x + 2] = rng.uniform(0, 255, 3)  # a speck of random colour
    return np.clip(out, 0, 255).astype(np.uint8)


def test_scorer_survives_blur_halo_and_specks(shape_model):
    samples = _held_out(120)
    hits = dict.fromkeys(("background", "colour", "position", "shape"), 0)
    for k, sample in enumerate(samples):
        seen = classifier.observe(_degrade(sample.image, k), shape_model)
        truth = sample.scene.shapes[0]
        hits["background"] += seen.background == sample.scene.background
        hits["colour"] += seen.colour == truth.colour
        hits["position"] += seen.position == truth.position
        hits["shape"] += seen.shape == truth.shape
    rates = {k: v / len(samples) for k, v in hits.items()}
    assert min(rates["background"], rates["colour"], rates["position"]) >= 0.97, rates
    assert rates["shape"] >= 0.9, rates

"""difusi-mini's procedural data: determinism, rendering truth and captions that never lie."""

from __future__ import annotations

import re

import numpy as np
import pytest

from difusi.mini import data

N = 400


@pytest.fixture(scope="module")
def samples() -> list[data.Sample]:
    return [data.make_sample(7, i) for i in range(N)]


def test_same_seed_and_index_give_identical_samples():
    a, b = data.make_sample(3, 41), data.make_sample(3, 41)
    assert np.array_equal(a.image, b.image)
    assert (a.caption, a.scene) == (b.caption, b.scene)


def test_different_indices_and_seeds_differ():
    images = {data.make_sample(seed, i).image.tobytes() for seed in (0, 1) for i in range(20)}
    assert len(images) == 40


def test_batch_matches_single_samples():
    images, captions = data.make_batch(5, 10, 4)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    for k in range(4):
        single = data.make_sample(5, 10 + k)
        assert np.array_equal(images[k], single.image) and captions[k] == single.caption


def _near(rgb: np.ndarray, colour: str) -> bool:
    return bool(np.abs(rgb.astype(int) - np.array(data.COLOURS[colour])).max() <= data.COLOUR_JITTER + 1)


def test_render_puts_shape_colour_at_its_centre_and_background_at_the_border(samples):
    for sample in samples[:100]:
        assert _near(sample.image[0, 0], sample.scene.background)
        assert _near(sample.image[-1, -1], sample.scene.background)
        for spec in sample.scene.shapes:
            fx, fy = data.POSITION_CENTRES[spec.position]
            # The nominal centre is inside circles and squares despite the +-2.6 px jitter; the triangle is
            # narrow there, so look 3 px lower, where it is wider than the jitter.
            y, x = int(fy * 64) + (3 if spec.shape == "triangle" else 0), int(fx * 64)
            patch = sample.image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3)
            assert any(_near(rgb, spec.colour) for rgb in patch), (sample.scene, patch)


def test_shape_masks_have_the_analytic_areas():
    radius, size = 20.0, 64
    areas = {shape: data.shape_mask(shape, 32, 32, radius, size).sum() for shape in data.SHAPES}
    assert areas["circle"] == pytest.approx(np.pi * radius**2, rel=0.01)
    assert areas["square"] == pytest.approx((2 * radius) ** 2, rel=0.01)
    assert areas["triangle"] == pytest.approx(0.5 * (2 * radius) ** 2, rel=0.02)


def test_unknown_shape_is_rejected():
    with pytest.raises(ValueError, match="shape must be one of"):
        data.shape_mask("hexagon", 32, 32, 10, 64)


def test_vocabulary_covers_the_issue():
    assert {"red", "green", "blue", "yellow", "white", "black", "orange", "purple"} <= set(data.COLOUR_NAMES)
    assert set(data.SHAPES) == {"circle", "square", "triangle"}
    assert set(data.POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert set(data.SIZES) == {"small", "big"}


def test_about_ten_percent_of_captions_are_empty(samples):
    empty = sum(s.caption == "" for s in samples)
    # Binomial(400, 0.1): mean 40, sd 6; 4 sd either side.
    assert 16 <= empty <= 64


def _colour_words(caption: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", caption) if w in data.COLOURS]


def _words_to_shape() -> dict[str, str]:
    out = {}
    for shape, synonyms in data.SHAPE_SYNONYMS.items():
        for synonym in synonyms:
            out[synonym.split()[-1]] = shape
    return out


def test_captions_only_name_colours_shapes_and_positions_that_are_in_the_picture(samples):
    shape_words = _words_to_shape()
    for sample in samples:
        words = re.findall(r"[a-z]+", sample.caption)
        true_colours = {s.colour for s in sample.scene.shapes} | {sample.scene.background}
        assert set(_colour_words(sample.caption)) <= true_colours, (sample.caption, sample.scene)
        named_shapes = {shape_words[w] for w in words if w in shape_words}
        assert named_shapes <= {s.shape for s in sample.scene.shapes}, (sample.caption, sample.scene)
        positions = {s.position for s in sample.scene.shapes}
        for position, phrases in data.POSITION_PHRASES.items():
            if any(phrase in sample.caption for phrase in phrases):
                assert position in positions, (sample.caption, sample.scene)


def test_background_phrase_names_the_background(samples):
    for sample in samples:
        match = re.search(r"(\w+) background", sample.caption)
        if match:
            assert match.group(1) == sample.scene.background, sample.caption
        match = re.search(r"on (\w+)$", sample.caption)
        if match and match.group(1) in data.COLOURS:
            assert match.group(1) == sample.scene.background, sample.caption


def test_canonical_description_states_every_attribute():
    spec = data.ShapeSpec("triangle", "red", "big", "left")
    assert data.describe(data.Scene("blue", (spec,))) == "a big red triangle on the left on a blue background"


def test_captions_use_synonyms_partial_descriptions_and_both_word_orders(samples):
    captions = [s.caption for s in samples]
    assert any("disc" in c or "ball" in c or "box" in c for c in captions)
    assert any(c.startswith(tuple(f"{c2} background" for c2 in data.COLOURS)) for c in captions)
    assert any(c.endswith("background") for c in captions)
    assert any(" shape" in c for c in captions)  # generic noun, what "a shape" prompts rely on
    assert any(c in data.COLOURS for c in captions)  # bare colour words, what negative prompts rely on
    assert any(" and " in c for c in captions)  # two-shape scenes


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_position_rate_controls_how_often_captions_name_the_position(rate):
    single, pairs = [], []
    for i in range(300):
        sample = data.make_sample(11, i, position_rate=rate)
        if not sample.caption:
            continue  # the unconditional share
        for spec, keep in zip(sample.scene.shapes, sample.mentioned["shapes"], strict=True):
            if keep["position"]:
                assert any(phrase in sample.caption for phrase in data.POSITION_PHRASES[spec.position])
            if len(sample.scene.shapes) == 2:
                pairs.append(keep["position"])
            elif sample.caption.split()[0] != spec.colour:  # bare-colour captions ("red circle") name no position
                single.append(keep["position"])
    assert len(single) > 150 and len(pairs) > 80
    if rate == 0.0:
        assert not any(single) and not any(pairs)
    else:
        assert all(single) and 0.6 < sum(pairs) / len(pairs) < 0.85  # pairs: 5/7 of the rate each


def test_default_position_rate_is_unchanged_by_the_option():
    assert data.make_sample(11, 5).caption == data.make_sample(11, 5, position_rate=data.POSITION_RATE).caption


def test_stated_position_is_the_one_position_a_caption_names():
    for index in range(400):
        sample = data.make_sample(3, index, 32)
        named = data.stated_position(sample.caption)
        keeps = sample.mentioned["shapes"]  # empty for an empty caption
        said = [shape.position for shape, keep in zip(sample.scene.shapes, keeps, strict=False) if keep["position"]]
        assert named == (said[0] if len(said) == 1 else None)
    assert data.stated_position("a red disc at the left and a blue box on the right") is None
    assert data.stated_position("a yellow disc") is None
    assert data.stated_position("a big ball in the middle on a red background") == "center"

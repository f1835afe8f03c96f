"""`difusi img2img` and `difusi generate --enable-hr` end to end, as real subprocesses on difusi-mini: the PNGs carry
A1111's keys, `--from` with the init picture remakes an img2img result bit for bit, bad pictures are one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from difusi.infotext import read_infotext


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFUSI_OUTPUTS_DIR": str(root / "outputs"), "DIFUSI_MODELS_DIR": str(root / "models"),
           "DIFUSI_CONFIG": str(root / "none.json")}
    return subprocess.run([sys.executable, "-m", "difusi", *args], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("img2img-cli")
    (root / "models").mkdir()
    done = _run(root, "generate", "a red circle on a blue background", "--seed", "7", "--steps", "6", "-o", "start.png")
    assert done.returncode == 0, done.stderr
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    mask.save(root / "mask.png")
    return root


def test_img2img_inpaint_and_remake_from_the_result(root):
    done = _run(root, "img2img", "start.png", "a green circle on a blue background", "--mask", "mask.png",
                "--denoising-strength", "0.7", "--seed", "3", "--steps", "6", "--inpainting-fill", "2",
                "--only-masked", "-o", "inpainted.png")
    assert done.returncode == 0, done.stderr
    text = read_infotext(root / "inpainted.png")
    for item in ("Denoising strength: 0.7", "Mask blur: 4", "Masked content: latent noise", "Inpaint area: Only masked",
                 "Masked area padding: 32", "Seed: 3,"):
        assert item in text, item
    again = _run(root, "img2img", "start.png", "--mask", "mask.png", "--from", "inpainted.png", "-o", "again.png")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(root / "again.png")), np.asarray(Image.open(root / "inpainted.png")))
    assert read_infotext(root / "again.png") == text


def test_hires_fix_from_the_command_line(root):
    done = _run(root, "generate", "a red circle", "--seed", "2", "--steps", "4", "--enable-hr", "--hr-scale", "2",
                "--hr-upscaler", "Latent (bicubic)", "--denoising-strength", "0.5", "-o", "hires.png")
    assert done.returncode == 0, done.stderr
    assert Image.open(root / "hires.png").size == (128, 128)
    text = read_infotext(root / "hires.png")
    assert "Size: 64x64" in text and "Hires upscale: 2" in text and "Hires upscaler: Latent (bicubic)" in text
    again = _run(root, "generate", "--from", "hires.png", "-o", "hires-again.png")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(root / "hires-again.png")), np.asarray(Image.open(root / "hires.png")))


@pytest.mark.parametrize(("args", "line"), [
    (["notes.txt", "x"], "IMAGE: is not a readable image"),
    (["start.png", "x", "--mask", "small.png"], "--mask: is 8x8 but the init picture is 64x64"),
    (["start.png", "x", "--mask", "black.png"], "--mask: is all black"),
    (["start.png", "x", "--denoising-strength", "1.5"], "--denoising-strength: must be in [0, 1], got 1.5"),
    (["start.png", "x", "--outpaint", "8", "--outpaint-directions", "north"], "--outpaint-directions: must name"),
])
def test_bad_input_is_one_line_and_exit_2(root, args, line):
    (root / "notes.txt").write_text("not a picture")
    Image.new("L", (8, 8), 255).save(root / "small.png")
    Image.new("L", (64, 64)).save(root / "black.png")
    before = sorted((root / "outputs").rglob("*.png"))
    done = _run(root, "img2img", *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"difusi: error: {done.stderr.split('error: ', 1)[1].strip()}"]
    assert line in done.stderr and "Traceback" not in done.stderr
    assert sorted((root / "outputs").rglob("*.png")) == before  # nothing made, nothing lost

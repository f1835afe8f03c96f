"""The README's Python examples run as written (in a scratch folder) and do what the README says."""

import os
import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    before = set(os.listdir(tmp_path))
    namespace: dict = {}
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), namespace)
    written = sorted(set(os.listdir(tmp_path)) - before - {"cache"})
    if "result" in namespace and hasattr(namespace["result"], "images"):
        result = namespace["result"]
        # every image the example saved exists, is a PNG of the reported seed, and carries its infotext
        saved = [name for name in written if name.endswith(".png")]
        assert len(saved) == len(result.images) > 0
        for image in result.images:
            match = [name for name in saved if name.endswith(f"-{image.seed}.png")]
            assert len(match) == 1
            with Image.open(tmp_path / match[0]) as png:
                assert png.info["parameters"] == image.infotext
                assert f"Seed: {image.seed}," in png.info["parameters"]

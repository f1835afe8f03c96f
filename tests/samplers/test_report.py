"""The sampler report writes a markdown table and a PNG with the measured numbers."""

import re

import pytest

from difusi.samplers import measure, report


def _rows(text, label):
    return [line for line in text.splitlines() if line.startswith(f"| {label} |")]


def test_report_small(tmp_path, monkeypatch):
    cases = [c for c in measure.ORDER_CASES if c.label in ("Euler", "Heun")]
    monkeypatch.setattr(report, "ORDER_CASES", cases)
    monkeypatch.setattr(report, "DISTRIBUTION_CASES", [c for c in measure.DISTRIBUTION_CASES if c.label == "DPM2 a"])
    monkeypatch.setattr(report, "measure_adaptive", lambda *p: measure.measure_adaptive(*p, rtols=(0.05, 0.01)))
    path = report.write_report(tmp_path, quick=True)
    assert path == tmp_path / "samplers-report.md"
    text = path.read_text()
    png = (tmp_path / "samplers-report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    for case in cases:
        (row,) = _rows(text, case.label)
        order = float(re.search(r"\*\*([0-9.]+)\*\*", row).group(1))
        assert case.expected[0] <= order <= case.expected[1]
    (dist_row,) = _rows(text, "DPM2 a")
    assert float(dist_row.split("|")[-2]) < 5  # max z
    assert "2,000 samples" in text


@pytest.mark.slow
def test_full_quick_report(tmp_path):
    text = report.write_report(tmp_path, quick=True).read_text()
    for case in measure.ORDER_CASES:
        assert len(_rows(text, case.label)) == 1

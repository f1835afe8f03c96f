"""Progress output: a tqdm bar (step count, it/s, ETA) on a terminal; plain throttled lines otherwise."""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass

from difusi import cli


@dataclass
class FakeProgress:
    step: int
    steps: int
    iteration: int
    n_iter: int
    image_index: int = 0
    latents: object = None


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _feed(reporter: cli._ProgressReporter, steps: int = 3, n_iter: int = 2, pause: float = 0.0) -> None:
    for iteration in range(n_iter):
        for step in range(1, steps + 1):
            time.sleep(pause)
            reporter.update(FakeProgress(step, steps, iteration, n_iter))
    reporter.close()


def test_terminal_gets_a_bar_with_rate_and_eta(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setenv("COLUMNS", "100")
    _feed(cli._ProgressReporter(), pause=0.12)  # tqdm redraws at most every 0.1 s
    frames = terminal.getvalue().split("\r")
    last = [frame for frame in frames if "6/6" in frame]
    assert last, terminal.getvalue()
    assert last[-1].startswith("batch 2/2: 100%")
    assert re.search(r"6/6 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+it/s\]", last[-1])


def test_pipe_gets_plain_lines_first_and_last(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    _feed(cli._ProgressReporter())
    lines = pipe.getvalue().splitlines()
    assert lines[0] == "difusi: step 1/3 batch 1/2  -- it/s"
    assert re.fullmatch(r"difusi: step 3/3 batch 2/2  [\d.]+ it/s  ETA 0s", lines[-1])
    assert len(lines) <= 6

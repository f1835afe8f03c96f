"""Run every case of the bad-input matrix and write docs/hardening.md (case, expected, observed).

    python tools/hardening_matrix.py [--out docs/hardening.md]

The cases live in tests/hardening/matrix.py (the same table drives tests/hardening/test_matrix.py). The observed
column is the real message of a real run: the CLI in-process, the Python API, and an HTTP server on loopback.
Exits 1 when any case does not behave as expected or the pickle sentinel file appears.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "hardening"), str(ROOT / "tests")]  # tests/: loopback.py
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cell(text: str, limit: int = 260) -> str:
    text = "".join(c if ord(c) >= 32 or c == "\n" else f"\\x{ord(c):02x}" for c in text)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "hardening.md"))
    args = parser.parse_args(argv)

    import httpx
    from hardening_harness import build_files, run_case, serve
    from matrix import CASES

    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        files = build_files(Path(tmp) / "matrix")
        with serve(files) as url, httpx.Client(base_url=url, timeout=120) as http:
            for case in CASES:
                observed = run_case(case, files, http)
                problems = observed.problems(case.expect)
                alive = http.get("/sdapi/v1/progress").status_code == 200
                if not alive:
                    problems.append("server stopped answering")
                failures += bool(problems)
                expected = f"{case.expect.outcome}" + (f" `{case.expect.field}`" if case.expect.field else "")
                expected += f": …{case.expect.text}…"
                shown = observed.outcome + (f" `{observed.field}`" if observed.field else "")
                observed.message = observed.message.replace(str(files.root), "$TMP")  # same text on every machine
                rows.append(f"| {case.id} | {case.surface} | {_cell(case.what, 90)} | {_cell(expected)} | "
                            f"{_cell(shown)}: {_cell(observed.message)} | {'ok' if not problems else '; '.join(problems)} |")
                print(f"{case.id:32} {'ok' if not problems else 'FAIL ' + '; '.join(problems)}", flush=True)
        sentinel = files.sentinel.exists()
    counts = {surface: sum(case.surface == surface for case in CASES) for surface in ("cli", "api", "http")}
    lines = [
        "# Hardening: the bad-input matrix",
        "",
        f"{len(CASES)} cases ({counts['cli']} CLI, {counts['api']} Python API, {counts['http']} HTTP), written by "
        "`python tools/hardening_matrix.py` from the table in `tests/hardening/matrix.py`, which also drives "
        "`tests/hardening/test_matrix.py`. *Observed* is the real message of this run: `difusi.cli.main` (one line on "
        "stderr; the exit code), `difusi.generate` / `difusi.models.load_model` (the exception), and a uvicorn server "
        "on loopback (status, JSON `field` and `detail`). After every case the server is asked for "
        "`/sdapi/v1/progress` and must still answer. `{models}` / `$TMP` stand for the run's temporary folders "
        "(models: only the bad files; difusi-mini is the server's model).",
        "",
        f"Pickle sentinel file created: **{'YES' if sentinel else 'no'}** (the `.ckpt` payloads would run "
        f"`touch SENTINEL` if unpickled unsafely). Cases failing their expectation: **{failures}**.",
        "",
        "| case | surface | input | expected | observed | check |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}: {len(CASES)} cases, {failures} failing, sentinel {'CREATED' if sentinel else 'absent'}")
    return 1 if failures or sentinel else 0


if __name__ == "__main__":
    sys.exit(main())

"""What a batch runs and what comes back: BatchJob, its stable id, and the Runner protocol every runner implements.

**Job id.** `job_id` is the first 24 hex digits of the sha256 of the job's resolved fields (every field of the
field table after validation: width/height filled from the model's native size, seeds concrete, `model` replaced by
the checkpoint's full sha256) as canonical JSON. So a re-run of the same file finds the same ids, a row edited in any
field (or pointed at another file) gets a new one, and renaming or moving a checkpoint does not.

**Seed -1.** A random seed would give a row a new id on every run, and a stopped batch would redo it. So a row
with seed (or subseed) -1 gets a seed derived from its own content: the sha256 of its other resolved fields plus
how many identical rows came before it in the file (0 for the first), reduced to [0, 2^32 - 2] like A1111's random
seeds. The same row in the same file always gets the same seed (resume works; inserting other rows changes
nothing), and two identical rows still get different seeds. The seed is recorded in the images' infotext and history,
so `difusi generate --seed N` with the other fields remakes the image.

**Thread count.** On the CPU, torch's kernels split work by thread count and round differently: measured on
difusi-mini at 64 and 128 px, 1 and 2 threads give bit-identical images, 3, 4, 6, 8 and 16 threads each differ by up
to one 8-bit level. The rule: a job carries `threads`, the torch intra-op thread count of the process that built it
(the batch driver: the same count `difusi generate` uses in that environment, i.e. torch's default, the machine's
cores, or `OMP_NUM_THREADS`), and `difusi.batch.local.run_job` runs the job at exactly that count, in-process or in
any worker. So a batch's images are bit-identical to `difusi generate` run where the driver runs, on any layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from difusi.params import FIELDS, RANDOM_SEED_MAX, GenerationParams

JOB_ID_CHARS = 24
_ID_VERSION = "difusi-batch-job-1"  # changes only if the id recipe changes (then old outputs are redone, not mixed)


@dataclass(frozen=True)
class BatchJob:
    """One row, validated and resolved: run `params` on the checkpoint `checkpoint` (None = difusi-mini).

    `checkpoint` is the row's model reference as written (path, name, "name [hash]" or hash), resolved by each
    runner against its `models_dir`; `model_sha256` is what the driver resolved it to, so a runner can check it
    loaded the same file, and jobs are grouped by it. `threads` is the torch CPU thread count the job must run at
    (module docstring); None = leave the process's count alone.
    """

    job_id: str
    row: int
    params: GenerationParams
    checkpoint: str | None
    model_sha256: str = ""
    threads: int | None = None

    @property
    def image_count(self) -> int:
        return self.params.total_images


@dataclass
class EncodedImage:
    """One finished image as a runner sends it back: the exact PNG bytes (pixels + infotext chunk) to write."""

    index: int
    seed: int
    subseed: int
    png: bytes
    infotext: str


@dataclass
class JobOutput:
    """A runner's answer for one job: all its images, or `error` (one line) when the job failed."""

    job_id: str
    row: int
    images: list[EncodedImage] = field(default_factory=list)
    error: str | None = None


class BatchFailure(NamedTuple):
    """A row that was not done: its row number, its job id ("" when it never became a job) and why."""

    row: int
    job_id: str
    reason: str


class Runner(Protocol):
    """Runs jobs somewhere (in-process, Ray) and yields one JobOutput per job as each finishes, in any order.

    A job that fails is a JobOutput with `error`, not an exception; an exception out of `run` means the runner
    itself broke. KeyboardInterrupt passes through."""

    def run(self, jobs: Sequence[BatchJob], models_dir: Path | None) -> Iterator[JobOutput]: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- ids and seeds


def resolved_fields(params: GenerationParams, model_sha256: str) -> dict[str, Any]:
    """The field-table values that define a job's images, `model` replaced by the checkpoint's sha256."""
    values = {name: getattr(params, name) for name in FIELDS}
    values["model"] = model_sha256
    return values


def job_id_for(params: GenerationParams, model_sha256: str) -> str:
    """The stable id of a job (module docstring): hash of its resolved fields and its model's sha256."""
    return _digest(_ID_VERSION, resolved_fields(params, model_sha256))[:JOB_ID_CHARS]


def derived_seed(params: GenerationParams, model_sha256: str, occurrence: int, which: str) -> int:
    """The seed a seed -1 row gets (module docstring): a function of the row's content and `occurrence`, in
    [0, RANDOM_SEED_MAX]. `which` ("seed" or "subseed") keeps the two seeds of one row independent."""
    content = resolved_fields(params, model_sha256)
    content.pop("seed")
    content.pop("subseed")
    digest = _digest(f"{_ID_VERSION}/{which}", {"fields": content, "occurrence": occurrence})
    return int(digest[:16], 16) % (RANDOM_SEED_MAX + 1)


def _digest(salt: str, values: dict[str, Any]) -> str:
    text = json.dumps(values, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(f"{salt}\n{text}".encode()).hexdigest()


def _json_default(value: Any) -> Any:
    return str(value)


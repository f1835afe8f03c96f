"""The in-process runner, and `run_job`: the one function that turns a job into PNG bytes.

Every runner (this one, each Ray worker) calls `run_job`, so a job's bytes are the same wherever it runs by
construction: the same `difusi.pipeline.txt2img`, the same `difusi.infotext.write_png`, the same torch thread count
(`BatchJob.threads`; see `difusi.batch.jobs` for the measured rule).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from difusi.batch.jobs import BatchJob, EncodedImage, JobOutput
from difusi.errors import DifusiError


def run_job(model: Any, job: BatchJob, models_dir: str | Path | None = None) -> JobOutput:
    """Generate one job's images with a loaded model and encode each as PNG bytes with its infotext; the prompt's
    LoRAs, embeddings and VAE come from `models_dir`'s network folders (`difusi.networks.job.library_for`).

    A failure of the job (bad values, NaN, the wrong model) is returned as `JobOutput.error`, one line, so the
    caller goes on with the next job; KeyboardInterrupt passes through."""
    from difusi.infotext import write_png
    from difusi.networks.job import library_for
    from difusi.pipeline import txt2img

    if job.model_sha256 and getattr(model, "sha256", job.model_sha256) != job.model_sha256:
        return JobOutput(job.job_id, job.row, error=f"model: loaded {getattr(model, 'name', '?')} "
                                                   f"(sha256 {model.sha256[:10]}), the job needs {job.model_sha256[:10]}")
    try:
        with torch_threads(job.threads):
            result = txt2img(model, job.params, networks=library_for(models_dir))
        images = []
        for generated in result.images:
            buffer = io.BytesIO()
            write_png(generated.image, buffer, generated.infotext)
            images.append(EncodedImage(generated.index, generated.seed, generated.subseed, buffer.getvalue(),
                                       generated.infotext))
    except DifusiError as error:
        return JobOutput(job.job_id, job.row, error=str(error))
    except Exception as error:  # noqa: BLE001 - one broken job must not end the batch; the reason is reported
        return JobOutput(job.job_id, job.row, error=f"{type(error).__name__}: {error}")
    return JobOutput(job.job_id, job.row, images)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block at `count` torch intra-op threads (None: unchanged), restoring the previous count after.

    CPU kernels round differently with other thread counts (`difusi.batch.jobs`), so a job runs at the count it
    was built with, wherever it runs."""
    import torch

    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LocalRunner:
    """Runs jobs one after another in this process; each checkpoint is loaded once for all its jobs."""

    def __init__(self, *, device: str = "auto", precision: str = "auto", offload: str = "none",
                 compile: bool = False):
        self.device, self.precision, self.offload, self.compile = device, precision, offload, compile

    def run(self, jobs: Sequence[BatchJob], models_dir: Path | None) -> Iterator[JobOutput]:
        for group in group_by_model(jobs):
            try:
                model = self._load(group[0], models_dir)
            except DifusiError as error:  # an unusable file fails its own rows, not the batch
                for job in group:
                    yield JobOutput(job.job_id, job.row, error=f"model: {error}")
                continue
            for job in group:
                yield run_job(model, job, models_dir)

    def _load(self, job: BatchJob, models_dir: Path | None) -> Any:
        from difusi.api import get_model

        model = get_model(job.checkpoint, models_dir, device=self.device, precision=self.precision,
                          offload=self.offload)
        if self.compile:
            from difusi.speed.compile import compile_unet

            compile_unet(model)
        return model

    def close(self) -> None:
        """Nothing to release: the model stays in `difusi.api`'s process-wide cache for the next call."""


def group_by_model(jobs: Sequence[BatchJob]) -> list[list[BatchJob]]:
    """Jobs grouped by checkpoint (its sha256, else its reference), groups and jobs in first-appearance order."""
    groups: dict[str, list[BatchJob]] = {}
    for job in jobs:
        groups.setdefault(job.model_sha256 or str(job.checkpoint), []).append(job)
    return list(groups.values())

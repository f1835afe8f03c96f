"""The worker side of the server: owns the model cache, runs txt2img jobs, saves their images.

Only the queue's worker thread calls `run_job`; the other methods are cheap reads that request
threads may call at any time (checkpoint listings, options, history).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difusi import settings
from difusi.errors import Interrupted, ParamError
from difusi.params import GenerationParams
from difusi.server import a1111
from difusi.server.queue import Job

DEFAULT_NATIVE_SIZE = 512
"""Stand-in native size for validating a request before its model is loaded (width/height omitted)."""


@dataclass
class Txt2ImgOutcome:
    """A finished (or interrupted) txt2img job: images, where they were saved, and A1111's `info` object."""

    images: list[Any] = field(default_factory=list)
    """`difusi.pipeline.GeneratedImage`s in job order (skipped batches leave gaps in their indices)."""
    files: list[str | None] = field(default_factory=list)
    """Path of each image relative to the outputs folder, None when not saved."""
    info: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


class Engine:
    """Model cache + pipeline + output store behind the job queue."""

    def __init__(self, models_dir: str | Path | None = None, outputs_dir: str | Path | None = None,
                 checkpoint: str | None = None, device: str = "cpu"):
        from difusi.models import ModelCache
        from difusi.store import OutputStore

        self.models_dir = settings.models_dir(models_dir)
        self.outputs_dir = settings.outputs_dir(outputs_dir)
        self.store = OutputStore(self.outputs_dir)
        self.store.recover()  # after a crash: every image on disk back in the history, dead temp files gone
        self._cache = ModelCache()
        self.device = device
        self._lock = threading.Lock()
        self._checkpoints: list[Any] | None = None
        self._extra: list[Any] = []  # checkpoints named by path outside the models folder (listed too)
        self._loaded: Any = None
        self._options: dict[str, Any] = {
            "samples_save": True,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "eta_noise_seed_delta": 0,
            "live_previews_enable": True,
            "show_progress_every_n_steps": 1,
        }
        # The operator's --model may be a path anywhere; requests may only name listed checkpoints.
        self._current = self._checkpoint_by_name(checkpoint, allow_path=True) if checkpoint else self._default_checkpoint()

    # -- checkpoints --------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Any]:
        """Checkpoints in the models folder plus the built-in default model (scanned once; see `refresh`)."""
        with self._lock:
            if self._checkpoints is None:
                self._checkpoints = self._scan()
            return list(self._checkpoints)

    def _scan(self) -> list[Any]:
        from difusi.models import default_model_path, list_checkpoints

        found = [info for info in list_checkpoints(self.models_dir) if _inside(Path(info.path), self.models_dir)]
        default = Path(default_model_path())
        outside = ([_describe(default)] if default.exists() else []) + self._extra
        for info in outside:
            if not any(Path(known.path).resolve() == Path(info.path).resolve() for known in found):
                found.append(info)
        return found

    def refresh(self) -> None:
        with self._lock:
            self._checkpoints = None

    def _default_checkpoint(self) -> Any:
        """difusi-mini when shipped, else the first checkpoint in the models folder, else None."""
        from difusi.models import default_model_path

        default = Path(default_model_path()).resolve()
        found = self.checkpoints()
        for info in found:
            if Path(info.path).resolve() == default:
                return info
        return found[0] if found else None

    def _checkpoint_by_name(self, name: str, field: str = "sd_model_checkpoint", allow_path: bool = False) -> Any:
        """Find a listed checkpoint by title "name [hash]", name, file name, short hash or listed path.

        Only `allow_path` (the operator's `--model`, never a request) adds a file from outside the models folder:
        a client must not make the server read, hash or load arbitrary files ("../", absolute paths).
        """
        wanted = name.strip()
        bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
        listed = self.checkpoints()
        # Most specific first, so "a.safetensors" or "a [hash]" never picks a.ckpt that merely shares the name "a".
        passes = (
            lambda info: wanted in (str(info.path), Path(info.path).name),
            lambda info: wanted == title(info),
            lambda info: wanted in (info.name, Path(info.path).stem),
            lambda info: bare in (info.name, Path(info.path).stem),
            lambda info: wanted.lower() in (info.short_hash or "", info.sha256 or ""),
        )
        for matches in passes:
            hit = next((info for info in listed if matches(info)), None)
            if hit is not None:
                return hit
        path = Path(wanted).expanduser() if allow_path else None
        if path is not None and path.exists():
            info = _describe(path)
            with self._lock:
                self._extra.append(info)
                self._checkpoints = None
            return info
        known = ", ".join(title(info) for info in self.checkpoints()) or "none"
        raise ParamError(field, f"unknown model {name!r}; available: {known} (POST /sdapi/v1/refresh-checkpoints after adding files)")

    def resolve_title(self, name: Any) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ParamError("sd_model_checkpoint", f"must be a checkpoint name, got {name!r}")
        return title(self._checkpoint_by_name(name))

    def current_title(self) -> str | None:
        return title(self._current) if self._current is not None else None

    def sd_models(self) -> list[dict[str, Any]]:
        return [
            {"title": title(info), "model_name": info.name, "hash": info.short_hash, "sha256": info.sha256,
             "filename": str(info.path), "config": None}
            for info in self.checkpoints()
        ]

    def native_size_hint(self, checkpoint_title: str | None) -> int:
        loaded = self._loaded
        wanted = checkpoint_title or self.current_title()
        if loaded is not None and title(loaded) == wanted:
            return loaded.native_size
        return DEFAULT_NATIVE_SIZE

    def loaded_model(self) -> Any:
        """The model in memory (for preview factors), None before the first job."""
        return self._loaded

    # -- options -------------------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        current = self._current
        return {"sd_model_checkpoint": self.current_title(), "sd_checkpoint_hash": current.sha256 if current else None,
                "outdir_samples": str(self.outputs_dir), **self._options}

    def set_options(self, values: dict[str, Any]) -> None:
        """Store A1111 options; CLIP_stop_at_last_layers and samples_save act as defaults for later jobs."""
        if "CLIP_stop_at_last_layers" in values:
            clip = values["CLIP_stop_at_last_layers"]
            if isinstance(clip, bool) or not isinstance(clip, int) or not 1 <= clip <= 12:
                raise ParamError("CLIP_stop_at_last_layers", f"must be an integer in [1, 12], got {clip!r}")
        if "samples_save" in values and not isinstance(values["samples_save"], bool):
            raise ParamError("samples_save", f"must be true or false, got {values['samples_save']!r}")
        # Folders are the operator's choice (--outputs-dir): a client may not point writes elsewhere. A1111 clients
        # post the whole options object back, so these keys are ignored rather than refused.
        self._options.update({key: value for key, value in values.items()
                              if not key.startswith("outdir") and key not in ("sd_checkpoint_hash",)})

    def param_defaults(self) -> dict[str, Any]:
        return {"clip_skip": self._options.get("CLIP_stop_at_last_layers", 1)}

    def default_save_images(self) -> bool:
        return bool(self._options.get("samples_save", True))

    # -- history ---------------------------------------------------------------------------------------------------
    def history(self, limit: int = 50, offset: int = 0, query: str | None = None) -> list[dict[str, Any]]:
        entries = self.store.history(limit=limit + offset, query=query)[offset:]
        return [_history_item(entry, self.outputs_dir) for entry in entries]

    # -- the worker ---------------------------------------------------------------------------------------------------
    def run_job(self, job: Job) -> Any:
        if job.kind == "txt2img":
            return self._txt2img(job)
        if job.kind == "load_model":
            info = self._checkpoint_by_name(job.payload)
            self._load(info)
            self._current = info
            return title(info)
        raise ValueError(f"unknown job kind {job.kind!r}")

    def _load(self, info: Any) -> Any:
        model = self._cache.get(info.path, device=self.device)
        self._loaded = model
        return model

    def _txt2img(self, job: Job) -> Txt2ImgOutcome:
        from difusi.pipeline import txt2img

        spec: a1111.Txt2ImgJob = job.payload
        info = self._checkpoint_by_name(spec.checkpoint) if spec.checkpoint else self._current
        if info is None:
            raise ParamError("sd_model_checkpoint", f"no model available: put a checkpoint in {self.models_dir}")
        job.report(textinfo="Loading model")
        model = self._load(info)
        params = spec.params.validated(native_size=model.native_size)
        job.report(n_iter=params.n_iter, total_images=params.total_images, steps=params.steps, textinfo=None)
        timestamp = a1111.job_timestamp(job.started)
        outcome = Txt2ImgOutcome()

        def on_image(image: Any) -> None:
            path = self.store.save(image) if spec.save_images else None
            outcome.images.append(image)
            outcome.files.append(path.relative_to(self.outputs_dir).as_posix() if path else None)
            job.report(images_done=len(outcome.images))

        def on_progress(progress: Any) -> None:
            latents = progress.latents.detach().clone() if progress.latents is not None else None
            job.report(latents=latents, step=progress.step, steps=progress.steps,
                       iteration=progress.iteration, n_iter=progress.n_iter)

        def should_skip() -> bool:
            if job.skipped:
                job.clear_skip()  # the pipeline abandons this batch only; the next one runs
                return True
            return False

        try:
            result = txt2img(model, params, progress=on_progress, should_stop=lambda: job.interrupted,
                             should_skip=should_skip, on_image=on_image)
        except Interrupted as stopped:
            partial = getattr(stopped, "result", None)
            outcome.interrupted = True
            outcome.info = self._info(partial, params, model, outcome, timestamp)
            return outcome  # the queue marks the job "interrupted"; A1111 answers 200 with the images so far
        outcome.info = self._info(result, params, model, outcome, timestamp)
        return outcome

    def _info(self, result: Any, params: GenerationParams, model: Any, outcome: Txt2ImgOutcome, timestamp: str) -> dict:
        resolved = result.params if result is not None and result.params is not None else params
        return a1111.build_info(
            resolved,
            seeds=list(result.seeds) if result is not None else [],
            subseeds=list(result.subseeds) if result is not None else [],
            infotexts=[image.infotext for image in outcome.images],
            model_name=model.name,
            model_hash=model.short_hash,
            timestamp=timestamp,
            interrupted=outcome.interrupted,
            image_seeds=[image.seed for image in outcome.images],
            files=list(outcome.files),
        )

    # -- live previews -----------------------------------------------------------------------------------------------
    _preview_cache: tuple[tuple[str, int, int], str | None] | None = None
    """(job id, batch, step) -> base64 PNG of the last preview rendered; set on the instance by `preview_png_b64`."""

    def preview_png_b64(self, job: Job) -> str | None:
        """The live preview of a running job as raw base64 PNG (None before its first step).

        Rendered once per (job, batch, step) and kept on this engine, because several clients (the web UI,
        A1111 scripts polling /progress) ask for the same step; the cache is one tuple, replaced whole, so
        request threads can read it without a lock (two racing threads at worst both render one step).
        """
        from difusi.server.preview import png_base64, preview_image

        latents = job.latents
        if latents is None:
            return None
        key = (job.id, job.progress.iteration, job.progress.step)
        cached = self._preview_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        image = png_base64(preview_image(latents, self.loaded_model()))
        self._preview_cache = (key, image)
        return image


def _inside(path: Path, folder: Path) -> bool:
    """True when `path`, symlinks resolved, is in `folder`: a link out of the models folder is not served."""
    try:
        return path.resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def title(info: Any) -> str:
    """A1111's checkpoint title: "name [short hash]"."""
    return f"{info.name} [{info.short_hash}]" if getattr(info, "short_hash", None) else info.name


def _describe(path: Path) -> Any:
    """A CheckpointInfo for a file outside the models folder (e.g. the shipped difusi-mini, a --model path)."""
    from difusi.models import CheckpointInfo
    from difusi.models.catalog import checkpoint_name
    from difusi.models.hashing import file_sha256, short_hash

    sha = file_sha256(path)
    return CheckpointInfo(checkpoint_name(path), path, short_hash(sha), sha, "")


def _history_item(entry: Any, outputs_dir: Path) -> dict[str, Any]:
    relative = Path(entry.path).relative_to(outputs_dir).as_posix()
    return {
        "id": entry.id, "created_at": entry.created_at, "path": relative, "url": f"/difusi/v1/outputs/{relative}",
        "prompt": entry.prompt, "negative_prompt": entry.negative_prompt, "seed": entry.seed,
        "sampler_name": entry.sampler, "scheduler": entry.scheduler, "steps": entry.steps,
        "cfg_scale": entry.cfg_scale, "width": entry.width, "height": entry.height,
        "model_name": entry.model_name, "model_hash": entry.model_hash, "infotext": entry.infotext,
        "params": entry.params,
    }

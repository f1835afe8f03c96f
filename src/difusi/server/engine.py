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
from difusi.strict_json import to_strict

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
                 checkpoint: str | None = None, device: str = "auto", *, precision: str = "auto",
                 offload: str = "none", compile: bool = False):
        from difusi.devices import check_offload, resolve_device, resolve_precision
        from difusi.models import ModelCache
        from difusi.store import OutputStore

        # Device, precision and memory mode are the operator's (`difusi serve` flags), checked before anything
        # else: a device this machine lacks is a ParamError here, never a 500 on every job later.
        self.device = str(resolve_device(device))
        resolve_precision(precision)
        self.precision, self.offload, self.compile = precision, check_offload(offload), compile

        self.models_dir = settings.models_dir(models_dir)
        self.outputs_dir = settings.outputs_dir(outputs_dir)
        self.store = OutputStore(self.outputs_dir)
        self.store.recover()  # after a crash: every image on disk back in the history, dead temp files gone
        from difusi.networks.job import library_for

        self.networks = library_for(self.models_dir)
        """LoRA / embedding / VAE files of the models folder (the batch and X/Y/Z runners use the same library)."""
        self._cache = ModelCache()
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
        """The models folder's checkpoints (none reached through a symlink out of it), then difusi-mini and the
        operator's --model file when they live elsewhere (`difusi.models.catalog.known_checkpoints`)."""
        from difusi.models.catalog import known_checkpoints

        known = known_checkpoints(self.models_dir)
        found = [info for info in known if _inside(Path(info.path), self.models_dir)]
        shipped = [info for info in known if _same_path(Path(info.path), _default_path())]
        for info in shipped + self._extra:
            if not any(_same_path(Path(listed.path), Path(info.path)) for listed in found):
                found.append(info)
        return found

    def refresh(self) -> None:
        """Forget the listing: the next `checkpoints()` rescans the models folder (A1111's refresh-checkpoints)."""
        with self._lock:
            self._checkpoints = None

    def _default_checkpoint(self) -> Any:
        """difusi-mini when shipped, else the first checkpoint in the models folder, else None."""
        default = _default_path().resolve()
        found = self.checkpoints()
        for info in found:
            if Path(info.path).resolve() == default:
                return info
        return found[0] if found else None

    def _checkpoint_by_name(self, name: str, field: str = "sd_model_checkpoint", allow_path: bool = False) -> Any:
        """The listed checkpoint `name` means, by the one resolver's A1111 rules (`models.catalog.find_checkpoint`).

        Only `allow_path` (the operator's `--model`, never a request) adds a file from outside the models folder:
        a client must not make the server read, hash or load arbitrary files ("../", absolute paths, symlinks out).
        """
        from difusi.models.catalog import AmbiguousCheckpointError, CheckpointNotFoundError, find_checkpoint

        wanted = name.strip()
        listed = self.checkpoints()
        try:
            return find_checkpoint(wanted, listed, str(self.models_dir))
        except AmbiguousCheckpointError as tie:
            raise ParamError(field, str(tie)) from None
        except CheckpointNotFoundError:
            pass
        path = Path(wanted).expanduser() if allow_path else None
        if path is not None and _exists(path):
            same = next((info for info in listed if _same_path(Path(info.path), path)), None)
            if same is not None:
                return same
            info = _describe(path)
            with self._lock:
                self._extra.append(info)
                self._checkpoints = None
            return info
        known = ", ".join(title(info) for info in listed) or "none"
        raise ParamError(field, f"unknown model {name!r}; available: {known} (POST /sdapi/v1/refresh-checkpoints after adding files)")

    def resolve_title(self, name: Any) -> str:
        """The title of the listed checkpoint a request names (options endpoint, override_settings); ParamError if none."""
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
        """Store A1111 options; those that set job fields (CLIP_stop_at_last_layers, eta_ancestral, s_noise, ...)
        and samples_save act as defaults for later jobs."""
        from difusi.params import FIELDS, check_field

        for spec in FIELDS.values():  # options that set job fields obey the field's own type and range
            if spec.option and spec.http and values.get(spec.option) is not None:
                try:
                    check_field(spec, values[spec.option])
                except ParamError as error:
                    raise ParamError(spec.option, error.message) from None
        if "samples_save" in values and not isinstance(values["samples_save"], bool):
            raise ParamError("samples_save", f"must be true or false, got {values['samples_save']!r}")
        # Folders are the operator's choice (--outputs-dir): a client may not point writes elsewhere. A1111 clients
        # post the whole options object back, so these keys are ignored rather than refused.
        self._options.update({key: value for key, value in values.items()
                              if not key.startswith("outdir") and key not in ("sd_checkpoint_hash",)})

    def param_defaults(self) -> dict[str, Any]:
        """Job-field defaults from the A1111 options that set fields (the field table's `option`, e.g.
        CLIP_stop_at_last_layers -> clip_skip); a request's own values and override_settings come on top."""
        from difusi.params import FIELDS

        return {spec.name: self._options[spec.option] for spec in FIELDS.values()
                if spec.option and spec.http and self._options.get(spec.option) is not None}

    def default_save_images(self) -> bool:
        return bool(self._options.get("samples_save", True))

    # -- history ---------------------------------------------------------------------------------------------------
    def history(self, limit: int = 50, offset: int = 0, query: str | None = None) -> list[dict[str, Any]]:
        entries = self.store.history(limit=limit + offset, query=query)[offset:]
        return [_history_item(entry, self.outputs_dir) for entry in entries]

    # -- the worker ---------------------------------------------------------------------------------------------------
    def run_job(self, job: Job) -> Any:
        if job.kind in ("txt2img", "img2img"):
            return self._txt2img(job)
        if job.kind == "xyz":
            return self._xyz(job)
        if job.kind == "load_model":
            info = self._checkpoint_by_name(job.payload)
            self._load(info)
            self._current = info
            return title(info)
        if job.kind == "unload_model":  # A1111 /unload-checkpoint: free the weights; the next job loads them again
            self._loaded = None
            self._preview_cache = None
            self._cache.clear()
            return None
        if job.kind == "reload_model":  # A1111 /reload-checkpoint: the current model back in memory
            if self._current is None:
                raise ParamError("sd_model_checkpoint", f"no model available: put a checkpoint in {self.models_dir}")
            self._load(self._current)
            return title(self._current)
        raise ValueError(f"unknown job kind {job.kind!r}")

    def _load(self, info: Any) -> Any:
        model = self._cache.get(info.path, device=self.device, precision=self.precision, offload=self.offload)
        if self.compile:
            from difusi.speed.compile import compile_unet

            compile_unet(model)  # idempotent: once per loaded model
        self._loaded = model
        return model

    def _txt2img(self, job: Job) -> Txt2ImgOutcome:
        """A txt2img or img2img job (the latter carries its pictures: `spec.pictures`, `spec.mask`)."""
        from difusi.pipeline import img2img, txt2img

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
            outcome.files.append(self._output_url_path(path))
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
            callbacks = {"progress": on_progress, "should_stop": lambda: job.interrupted, "should_skip": should_skip,
                         "on_image": on_image, "networks": self.networks}
            if spec.pictures is None:
                result = txt2img(model, params, **callbacks)
            else:
                result = img2img(model, params, spec.pictures, spec.mask, **callbacks)
        except Interrupted as stopped:
            partial = getattr(stopped, "result", None)
            outcome.interrupted = True
            outcome.info = self._info(partial, params, model, outcome, timestamp, spec)
            return outcome  # the queue marks the job "interrupted"; A1111 answers 200 with the images so far
        outcome.info = self._info(result, params, model, outcome, timestamp, spec)
        return outcome

    def _xyz(self, job: Job) -> Txt2ImgOutcome:
        """An X/Y/Z plot (`difusi.batch.xyz`): cells through this engine's model cache, one at a time, each saved
        with its history row; grids saved under `<outputs>/xyz-grids/`. Images: the grid (A1111's grid of grids
        when Z has several values), the per-Z grids when asked (include_sub_grids), then the cells when asked."""
        from difusi.batch import xyz
        from difusi.pipeline import GeneratedImage

        payload: a1111.XYZJob = job.payload
        spec, script = payload.spec, payload.script
        info = self._checkpoint_by_name(spec.checkpoint) if spec.checkpoint else self._current
        if info is None:
            raise ParamError("sd_model_checkpoint", f"no model available: put a checkpoint in {self.models_dir}")
        # Cells without a Checkpoint axis run on the job's model; naming it by title makes the batch job carry its
        # sha256, so a cell can never run on another model by mistake.
        params = spec.params.replace(model=title(info))
        planned = xyz.plan(params, script.x, script.y, script.z)
        total = sum(cell.params.total_images for cell in planned.cells)
        job.report(n_iter=len(planned.cells), total_images=total, steps=params.steps, textinfo="X/Y/Z plot")

        def load(checkpoint: str | None) -> Any:
            return self._load(self._checkpoint_by_name(checkpoint) if checkpoint else info)

        done = {"cells": 0, "images": 0}

        def on_cell(cell: Any) -> None:
            # progress counts cells as A1111's batches (`iteration` of `n_iter`): the share of the plot done
            done["cells"] += 1
            done["images"] += len(cell.images)
            job.report(images_done=done["images"], iteration=done["cells"], step=0)

        runner = xyz.PipelineRunner(load, should_stop=lambda: job.interrupted)
        timestamp = a1111.job_timestamp(job.started)
        outcome = Txt2ImgOutcome()
        try:
            result = xyz.xyz_plot(params, planned.x, planned.y, planned.z, runner=runner,
                                  store=self.store if spec.save_images else None, models_dir=self.models_dir,
                                  draw_legend=script.draw_legend, margin=script.margin_size, on_cell=on_cell,
                                  fix_seeds=not script.no_fixed_seeds)
        except Interrupted:
            outcome.interrupted = True
            outcome.info = a1111.build_info(params, [], [], [], info.name, info.short_hash, timestamp,
                                            interrupted=True, ignored_fields=list(spec.ignored))
            return outcome
        first = result.cells[0]
        grids = [(result.z_grid, result.infotext)] if result.z_grid is not None else []
        if result.z_grid is None or script.include_sub_grids:
            grids += list(zip(result.grids, result.grid_infotexts, strict=True))
        for picture, text in grids:
            path = xyz.save_grid(picture, text, self.outputs_dir) if spec.save_images else None
            outcome.images.append(GeneratedImage(picture, first.seed, first.subseed, len(outcome.images), text,
                                                 first.params))
            outcome.files.append(self._output_url_path(path))
        if payload.send_cells:
            for cell in result.cells:
                for image, path in zip(cell.images, cell.paths or [None] * len(cell.images), strict=True):
                    outcome.images.append(GeneratedImage(image.image, image.seed, image.subseed,
                                                         len(outcome.images), image.infotext, image.params))
                    outcome.files.append(self._output_url_path(path))
        model = self._loaded
        outcome.info = a1111.build_info(
            first.params, seeds=[image.seed for image in outcome.images],
            subseeds=[image.subseed for image in outcome.images], infotexts=[image.infotext for image in outcome.images],
            model_name=model.name, model_hash=model.short_hash, timestamp=timestamp, image_seeds=[
                image.seed for image in outcome.images], files=list(outcome.files), warnings=[],
            ignored_fields=list(spec.ignored), index_of_first_image=len(grids),
            xyz={"x": script.x.labels(), "y": script.y.labels(), "z": script.z.labels(), "grids": len(grids),
                 "cells": len(result.cells)})
        return outcome

    def _output_url_path(self, path: Path | None) -> str | None:
        """A saved image's path relative to the outputs folder (what /difusi/v1/outputs/ serves); None if not saved."""
        return path.relative_to(self.outputs_dir).as_posix() if path else None

    def _info(self, result: Any, params: GenerationParams, model: Any, outcome: Txt2ImgOutcome, timestamp: str,
              spec: a1111.Txt2ImgJob) -> dict:
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
            # Until those features exist, say what was not done rather than drop it silently (issue 19).
            warnings=list(getattr(result, "warnings", None) or []),
            ignored_fields=list(spec.ignored),
            denoising_strength=resolved.denoising_strength if spec.pictures is not None or resolved.enable_hr
            else None,
            is_using_inpainting_conditioning=bool(model.inpainting),
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
    """A1111's checkpoint title, "name [short hash]": `CheckpointInfo.title` / `LoadedModel.title`, the one builder."""
    return str(info.title)


def _describe(path: Path) -> Any:
    """A CheckpointInfo for a file outside the models folder (the operator's --model path)."""
    from difusi.models.catalog import describe_checkpoint

    return describe_checkpoint(path)


def _default_path() -> Path:
    from difusi.models import default_model_path

    return Path(default_model_path())


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # NUL byte, name too long: no such file
        return False


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def _history_item(entry: Any, outputs_dir: Path) -> dict[str, Any]:
    relative = Path(entry.path).relative_to(outputs_dir).as_posix()
    return {
        "id": entry.id, "created_at": entry.created_at, "path": relative, "url": f"/difusi/v1/outputs/{relative}",
        "prompt": entry.prompt, "negative_prompt": entry.negative_prompt, "seed": entry.seed,
        "sampler_name": entry.sampler, "scheduler": entry.scheduler, "steps": entry.steps,
        "cfg_scale": entry.cfg_scale, "width": entry.width, "height": entry.height,
        "model_name": entry.model_name, "model_hash": entry.model_hash, "infotext": entry.infotext,
        # Stored params hold s_tmax = inf: strict JSON writes it as null (difusi.strict_json), not `Infinity`.
        "params": to_strict(entry.params),
    }

"""What one job's extra networks do to the loaded model: the one place the pipeline calls.

`prepare_job(model, params, library)` runs before the prompts are encoded: it removes the prompt's `<lora:...>`
tags, resolves them in the library, merges exactly those LoRAs into the model (un-merging whatever the previous job
left), puts the job's VAE (`sd_vae`) in place, and returns the prompt CLIP must see, the warnings and A1111's
infotext items (`Lora hashes`, `VAE hash`, `VAE`). Every job goes through it, so a job without tags always runs on
the checkpoint's own weights.

`NetworkLibrary` is what one front end can use: the models folder's LoRA folders plus difusi-mini's shipped ones
(`difusi.models.folders`), listed once and re-listed on `refresh()` (A1111's "refresh" buttons and
`/sdapi/v1/refresh-loras`), with the files read once into an LRU cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difusi.errors import NetworkError, ParamError
from difusi.models.folders import kind_folders
from difusi.models.vae_files import AUTOMATIC, NONE, apply_vae_setting, list_vae_files, resolve_vae, vae_names
from difusi.networks.apply import NetworkUse, apply_networks
from difusi.networks.embeddings import EmbeddingDatabase, EmbeddingSet
from difusi.networks.files import NetworkFile, NetworkReader, find_lora, list_loras
from difusi.networks.tags import PromptNetworks, parse_network_tags


class NetworkLibrary:
    """The extra networks of one models folder (None: only the shipped ones)."""

    def __init__(self, models_dir: str | Path | None = None, *, cache_size: int = 8):
        self.models_dir = None if models_dir is None else Path(models_dir).expanduser()
        self.reader = NetworkReader(cache_size)
        self._loras: list[NetworkFile] | None = None
        self._vaes: list[Path] | None = None
        self._lock = threading.Lock()

    def loras(self) -> list[NetworkFile]:
        """The LoRA / LyCORIS files (listed on first use and after `refresh`)."""
        with self._lock:
            if self._loras is None:
                self._loras = list_loras(self.models_dir)
            return self._loras

    def vae_files(self) -> list[Path]:
        """VAE files: the VAE folders' and `*.vae.*` files next to checkpoints (A1111's `sd_vae.refresh_vae_list`)."""
        with self._lock:
            if self._vaes is None:
                self._vaes = list_vae_files(kind_folders("vae", self.models_dir),
                                            kind_folders("checkpoint", self.models_dir))
            return self._vaes

    def embeddings(self, model: Any) -> EmbeddingSet:
        """The embedding folders' files split into loaded / skipped for `model` (rescanned each time: unchanged
        files come from the embeddings module's cache, so a file dropped into the folder works at the next job)."""
        return EmbeddingDatabase(kind_folders("embedding", self.models_dir)).for_model(model)

    def vae_names(self) -> list[str]:
        """What `sd_vae` may name besides "Automatic" and "None" (A1111's `GET /sdapi/v1/sd-vae` model names)."""
        return vae_names(self.vae_files())

    def refresh(self) -> None:
        """Forget the listings: the next use scans the folders again (parsed files stay cached by mtime)."""
        with self._lock:
            self._loras = None
            self._vaes = None

    def find_lora(self, name: str) -> NetworkFile:
        """The file a tag names (`difusi.networks.files.find_lora`); a file added since the listing is found too."""
        try:
            return find_lora(name, self.loras())
        except NetworkError:
            self.refresh()
        try:
            return find_lora(name, self.loras())
        except NetworkError as missing:
            searched = ", ".join(str(folder) for folder in kind_folders("lora", self.models_dir, shipped=False))
            where = f"searched {searched}" if searched else f"no LoRA folder under {self.models_dir}"
            raise NetworkError(missing.name, f"{missing.message} ({where})") from None


_LIBRARIES: dict[Path | None, NetworkLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()


def library_for(models_dir: str | Path | None) -> NetworkLibrary:
    """The process-wide library of a models folder (one per folder, so parsed files are shared by every caller)."""
    key = None if models_dir is None else Path(models_dir).expanduser().resolve()
    with _LIBRARIES_LOCK:
        if key not in _LIBRARIES:
            _LIBRARIES[key] = NetworkLibrary(key)
        return _LIBRARIES[key]


@dataclass
class JobNetworks:
    """A job's networks once applied: the positive prompt for CLIP, warnings, and infotext items."""

    prompt: str
    warnings: list[str] = field(default_factory=list)
    infotext: dict[str, str] = field(default_factory=dict)
    loras: list[tuple[str, NetworkFile]] = field(default_factory=list)
    """(name as written in the prompt, file) of each LoRA applied."""
    embeddings: EmbeddingSet | None = None
    """The embeddings the job's prompts may trigger (`difusi.networks.embeddings.attach` while encoding)."""


def check_job(params: Any, library: NetworkLibrary, *, allow_paths: bool = True) -> PromptNetworks:
    """Parse the tags and resolve every LoRA and the VAE name without touching a model, so front ends fail before
    any work (ParamError for a bad multiplier, NetworkError for an unknown or ambiguous name). `allow_paths=False`
    (requests from the network) accepts only files listed in the folders, never a path. The hires fix's upscaler
    is a file of the models folder too: an unknown one is a ParamError("hr_upscaler") here, before any work."""
    _check_hires_upscaler(params, library)
    return _resolve(params, library, allow_paths)[0]


def _check_hires_upscaler(params: Any, library: NetworkLibrary) -> None:
    from difusi.hires import LATENT_UPSCALE_MODES, is_latent_upscaler

    if not getattr(params, "enable_hr", False) or is_latent_upscaler(params.hr_upscaler):
        return
    from difusi.upscalers import get_upscaler

    try:
        get_upscaler(params.hr_upscaler, library.models_dir)
    except ParamError as error:
        raise ParamError("hr_upscaler", f"{error.message}; or a latent mode: {', '.join(LATENT_UPSCALE_MODES)}") from None


def _resolve(params: Any, library: NetworkLibrary, allow_paths: bool) -> tuple[PromptNetworks, list[NetworkFile]]:
    """The parsed prompt and the file of each of its LoRA tags (in order); the VAE choice checked."""
    parsed = parse_network_tags(params.prompt)
    files = [library.find_lora(tag.name) for tag in parsed.loras]
    try:
        found = resolve_vae(params.sd_vae, None, library.vae_files())
    except NetworkError:
        library.refresh()  # a file added since the folders were listed
        found = resolve_vae(params.sd_vae, None, library.vae_files())
    if not allow_paths and found is not None and found not in library.vae_files():
        names = ", ".join(library.vae_names()) or "none"
        raise NetworkError(params.sd_vae, f"no VAE of that name in the VAE folder; choose {AUTOMATIC!r}, {NONE!r} or "
                                          f"one of: {names}", field="sd_vae")
    return parsed, files


def lora_hash_notes(lora_hashes: str, library: NetworkLibrary) -> list[str]:
    """What an infotext's `Lora hashes` ("name: hash, name: hash") says about the files here: a note for each LoRA
    whose file now has another hash (the image will differ), nothing for the ones that match. A missing file is
    not a note: the job itself fails naming it."""
    notes = []
    for entry in lora_hashes.split(","):
        name, _, wanted = entry.strip().rpartition(": ")
        if not name or not wanted:
            continue
        try:
            found = library.find_lora(name)
        except NetworkError:
            continue
        if not found.sha256.startswith(wanted.lower()):
            notes.append(f"LoRA {name}: the image was made with a file of hash {wanted}, {found.path} has "
                         f"{found.shorthash}; the result will differ")
    return notes


def prepare_job(model: Any, params: Any, library: NetworkLibrary | None = None) -> JobNetworks:
    """Apply the job's networks to `model` (see the module docstring) and say what was done."""
    library = library_for(None) if library is None else library
    parsed, files = _resolve(params, library, allow_paths=True)
    uses: list[NetworkUse] = []
    named: list[tuple[str, NetworkFile]] = []
    for tag, file in zip(parsed.loras, files, strict=True):
        uses.append(NetworkUse(library.reader.read(file), tag.te_multiplier, tag.unet_multiplier, tag.name))
        if tag.te_multiplier != 0 or tag.unet_multiplier != 0:
            named.append((tag.name, file))
    warnings = list(parsed.warnings) + apply_networks(model, uses)
    vae = apply_vae_setting(model, params.sd_vae, library.vae_files())
    infotext: dict[str, str] = {}
    if named:
        # A1111 writes the name as the prompt mentions it, without ":" and ",", once per network.
        hashes = dict.fromkeys(f"{name.replace(':', '').replace(',', '')}: {file.shorthash}" for name, file in named)
        infotext["Lora hashes"] = ", ".join(hashes)
    if vae is not None:  # A1111's keys (`sd_vae.get_loaded_vae_hash`, `get_loaded_vae_name`)
        infotext["VAE hash"] = vae.short_hash
        infotext["VAE"] = vae.name
    return JobNetworks(parsed.prompt, warnings, infotext, named, library.embeddings(model))

"""`load_model`: a checkpoint file or diffusers folder -> difusi's own UNet / VAE / CLIP modules, offline.

Modules are constructed from detected config dicts with the weight initialisers switched off (no random
init, no memory touched) and then take the checkpoint's tensors directly (`load_state_dict(assign=True)`), so
loading costs about one model's worth of memory in the requested dtype. Nothing here touches a
model hub: no `from_pretrained` on a hub id, configs come from the file's shapes or the folder.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difusi.devices import Precision, check_offload, resolve_device, resolve_precision
from difusi.errors import CheckpointError
from difusi.models import convert
from difusi.models.catalog import default_model_path, format_title  # noqa: F401  (default_model_path: re-exported)
from difusi.models.detect import ModelSpec, TextEncoderSpec, detect
from difusi.models.families import FamilySpec, base_spec, detect_diffusers, variant_for
from difusi.models.files import CheckpointFile, is_diffusers_folder, read_component_state_dict, read_json
from difusi.models.hashing import file_sha256, short_hash
from difusi.models.sidecar import read_sidecar
from difusi.models.text_encoders import encoder_settings, wrap_text_encoder

log = logging.getLogger("difusi.models")

@dataclass(eq=False)
class LoadedModel:
    """Everything the pipeline needs from a checkpoint. SD noise schedule: scaled-linear betas, 1000 steps."""

    name: str
    path: Path
    family: str
    prediction_type: str
    unet: Any = field(repr=False)
    vae: Any = field(repr=False)
    text_encoders: list[Any] = field(repr=False)
    native_size: int
    vae_scale_factor: int
    latent_channels: int
    scaling_factor: float
    latent_rgb_factors: list[list[float]] | None
    latent_rgb_bias: list[float] | None
    family_spec: FamilySpec | None = field(default=None, repr=False)
    """The family record (`difusi.models.families`): key "sd1", "sd2", "sd2-v", "sdxl" or "difusi-mini"."""
    dtype: torch.dtype = torch.float32
    """The UNet's dtype (kept for older callers; `precision` has every network's)."""
    device: torch.device = torch.device("cpu")
    """The execution device: where latents live and the networks compute (with offload their weights rest on
    the CPU between calls, so read this, not a parameter's device)."""
    precision: Precision = Precision.uniform(torch.float32)
    offload: str = "none"
    """Memory mode (`difusi.devices.OFFLOAD_MODES`); hooks in `offload_hooks` when one is active."""
    offload_hooks: Any = field(default=None, repr=False)
    """The `difusi.models.offload.Offload` installed (None for "none" and on the CPU, where it is a no-op)."""
    compiled: bool = False
    """Whether `difusi.speed.compile.compile_unet` wrapped the UNet with torch.compile."""
    unet_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] = field(default_factory=dict)
    text_encoder_configs: list[dict[str, Any]] = field(default_factory=list)
    sidecar: dict[str, Any] = field(default_factory=dict)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    derived: dict[str, Any] = field(default_factory=dict, repr=False)
    """Objects made from the weights by other modules (a compiled UNet graph, `difusi.speed.graph`), dropped with the
    model by `free_model` (so the loader needs to know none of them)."""
    _sha256: str | None = None

    @property
    def inpainting(self) -> bool:
        """An inpainting checkpoint (sd-v1-5-inpainting, SDXL inpainting): its UNet also reads the mask and the masked
        picture's latents (`latent_channels + 5` input channels)."""
        return int(self.unet_config.get("in_channels", self.latent_channels)) == self.latent_channels + 5

    @property
    def sha256(self) -> str:
        """Full sha256 of the file (computed on first use, then cached on disk by size+mtime)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def short_hash(self) -> str:
        """A1111's "Model hash" (first 10 hex digits of sha256)."""
        return short_hash(self.sha256)

    @property
    def title(self) -> str:
        """A1111's checkpoint title, "name [hash]" (the same builder as `CheckpointInfo.title`)."""
        return format_title(self.name, self.short_hash)

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet takes SDXL's size conditioning (kept for older callers; read `family_spec` instead)."""
        return (self.family_spec or base_spec(self.family)).size_conditioning


# ----------------------------------------------------------------------------- module construction


def _build_and_adopt(cls: Any, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], what: str) -> Any:
    """Construct `cls` from `config` without initialising its weights, then adopt `state`'s tensors as its
    parameters (`load_state_dict(assign=True)`: no copy).

    Built on the CPU with the weight initialisers switched off (`_no_weight_init`), not on the `meta` device: the
    untouched `torch.empty` storage costs no memory (the pages are never written, and are freed when `state`'s
    tensors take their place), while the first ops on `meta` import torch's Python meta registrations and
    symbolic-shape machinery (sympy): about 0.4 s of every first image on this machine (bench/startup.py)."""
    with _no_weight_init():
        module = cls.from_config(dict(config)) if hasattr(cls, "from_config") else cls(config)
    _adopt(module, state, what)
    return module


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                 "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """`torch.nn.init`'s initialisers as no-ops while modules are built whose weights are replaced right after (the
    idea of accelerate's `init_empty_weights`, without the meta device). Layers call them as `init.<name>`, so
    replacing the module attributes reaches every `reset_parameters`."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    with _INIT_LOCK:
        try:
            for name in _INITIALISERS:
                setattr(torch.nn.init, name, _keep)
            yield
        finally:
            for name, function in saved.items():
                setattr(torch.nn.init, name, function)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


_INIT_LOCK = threading.Lock()


def _adopt(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {items[:3]}" for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items
        )
        raise CheckpointError(f"{what}: the checkpoint's tensors do not fit the detected architecture ({detail})")
    module.load_state_dict(state, strict=True, assign=True)


def _text_model_class(with_projection: bool) -> Any:
    """difusi's own CLIP text models (`difusi.models.clip`): transformers' module for module, without the second
    and more transformers' import costs; transformers stays the tests' reference."""
    from difusi.models.clip import text_model_class

    return text_model_class(with_projection)


def _build_text_encoder(spec: TextEncoderSpec, state: Mapping[str, torch.Tensor], what: str) -> Any:
    from difusi.models.clip import CLIPTextConfig

    config = CLIPTextConfig(spec.config)
    with _no_weight_init():
        model = _text_model_class(spec.with_projection)(config)
    _adopt(model, _fit_text_state(model, state), what)
    return model


def _fit_text_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match the model's own key style: transformers 5 `CLIPTextModel` has no `text_model.` level, `...WithProjection` has."""
    prefixed = any(k.startswith("text_model.") for k in model.state_dict())
    has_projection = any(k.startswith("text_projection.") for k in model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        if bare in ("embeddings.position_ids",):
            continue
        if bare.startswith("text_projection."):
            if has_projection:
                out[bare] = value
            continue
        out[("text_model." if prefixed else "") + bare] = value
    return out


def _unet_class() -> Any:
    """difusi's own SD UNet (`difusi.models.unet`): diffusers' `UNet2DConditionModel` module for module (same state
    dict, same outputs; tests/models/test_own_modules.py), without the seconds diffusers' import costs."""
    from difusi.models.unet import UNet

    return UNet


def _vae_class() -> Any:
    """difusi's own `AutoencoderKL` (`difusi.models.autoencoder`), equal to diffusers' on the same weights."""
    from difusi.models.autoencoder import AutoencoderKL

    return AutoencoderKL


def _finish(module: Any, device: str | torch.device) -> Any:
    module.to(device)
    module.eval()
    module.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------- prediction type


def _prediction_from_file(reader: CheckpointFile) -> str | None:
    """v-prediction markers real files carry: a `v_pred` tensor (ComfyUI convention) or training metadata."""
    if "v_pred" in reader.shapes:
        return "v_prediction"
    meta = {k.lower(): str(v).lower() for k, v in reader.metadata.items()}
    if meta.get("modelspec.prediction_type") in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if meta.get("ss_v_parameterization") == "true":
        return "v_prediction"
    if meta.get("modelspec.prediction_type") in ("epsilon", "eps"):
        return "epsilon"
    return None


@torch.no_grad()
def guess_sd2_prediction(unet: Any) -> str:
    """A1111's test for unmarked SD2 files: a v-model's output at t=999 on a flat 0.5 latent is strongly negative.

    (AUTOMATIC1111 `sd_models_config.is_using_v_parameterization_for_sd2`.) Only meaningful for trained weights.
    """
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return "v_prediction" if (out.float() - x.float()).mean().item() < -1 else "epsilon"


# ----------------------------------------------------------------------------- entry point


def load_model(path: str | Path, device: str | torch.device = "auto", precision: str = "auto", offload: str = "none",
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a single-file LDM checkpoint (.safetensors / .ckpt) or a diffusers folder, fully offline.

    `device` is resolved by `difusi.devices.resolve_device` ("auto": CUDA, then MPS, then the CPU) and
    `precision` by `difusi.devices.resolve_precision` ("auto": float16 on CUDA/MPS, float32 on the CPU); `dtype`,
    when given, overrides `precision` with one dtype for every network (the older form of this call). Weights
    stored in another precision (e.g. fp16 files) are cast on reading. `offload` is a memory mode
    (`difusi.devices.OFFLOAD_MODES`, see `difusi.models.offload`; a no-op on the CPU). Bad device, precision or
    offload values raise `ParamError` before the file is read; `CheckpointError` for missing/unreadable/unsafe
    files and `UnsupportedModelError` for families difusi does not run yet (the message names what was detected).
    """
    target = resolve_device(device)
    chosen = Precision.uniform(dtype) if dtype is not None else resolve_precision(precision, target)
    check_offload(offload)
    # With an offload mode every network is built on the CPU; `_place` then hands each to the device its mode says.
    build_on = torch.device("cpu") if offload != "none" else target
    path = Path(path).expanduser()
    if is_diffusers_folder(path):
        model = _load_diffusers_folder(path, build_on, chosen)
    else:
        reader = CheckpointFile(path)
        try:
            model = _load_single_file(reader, build_on, chosen)
        finally:
            reader.close()
    return _place(model, target, offload)


def _place(model: LoadedModel, device: torch.device, offload: str) -> LoadedModel:
    """Record the execution device and install the offload hooks (`difusi.models.offload`)."""
    from difusi.models.offload import apply_offload

    model.device, model.offload = device, offload
    models = [getattr(encoder, "model", encoder) for encoder in model.text_encoders]
    model.offload_hooks = apply_offload(model.unet, model.vae, models, offload, device)
    return model


def _component_dtypes(family: FamilySpec, precision: Precision) -> list[tuple[str, torch.dtype]]:
    """(LDM key prefix, dtype) per network: UNet, VAE, then the family's text encoders."""
    return [(convert.UNET_PREFIX, precision.unet), (convert.VAE_PREFIX, precision.vae),
            *((layout.ldm_prefix, precision.text_encoder) for layout in family.text_encoders)]


def _load_single_file(reader: CheckpointFile, device: str | torch.device, precision: Precision) -> LoadedModel:
    sidecar = read_sidecar(reader.path)
    spec = detect(reader.shapes, sidecar)
    family = spec.family_spec or base_spec(spec.family)
    prefixes = _component_dtypes(family, precision)
    wanted = {}
    for key in reader.shapes:
        dtype = next((dtype for prefix, dtype in prefixes if key.startswith(prefix)), None)
        if dtype is not None:
            wanted[key] = dtype
    state = reader.tensors(wanted)  # cast while reading: one copy per tensor, in its final dtype; threads in parallel
    unet_sd, vae_sd, text_sds = convert.split_ldm_checkpoint(state, spec.family, spec.unet_config, spec.vae_config)
    del state
    name = sidecar.get("name") or reader.path.name.rsplit(".", 1)[0]
    unet = _finish(_build_and_adopt(_unet_class(), spec.unet_config, unet_sd, f"{reader.path} UNet"), device)
    vae = _finish(_build_and_adopt(_vae_class(), spec.vae_config, vae_sd, f"{reader.path} VAE"), device)
    texts = [
        _finish(_build_text_encoder(t, sd, f"{reader.path} text encoder {i}"), device)
        for i, (t, sd) in enumerate(zip(spec.text_encoders, text_sds, strict=True))
    ]
    prediction = sidecar.get("prediction_type") or _prediction_from_file(reader)
    if prediction is None:
        prediction = guess_sd2_prediction(unet) if family.guess_v_prediction else family.prediction_type
    return _assemble(reader.path, name, spec, prediction, unet, vae, texts, sidecar, device, precision)


def _assemble(path: Path, name: str, spec: ModelSpec, prediction: str, unet: Any, vae: Any, texts: list[Any],
              sidecar: Mapping[str, Any], device: str | torch.device, precision: Precision) -> LoadedModel:
    """The LoadedModel: family record defaults (variant picked by prediction type), sidecar values over them."""
    family = variant_for(spec.family_spec or base_spec(spec.family), prediction)
    same_latents = spec.latent_channels == family.latent_channels
    factors = [list(row) for row in family.latent_rgb_factors] if same_latents and family.latent_rgb_factors else None
    bias = list(family.latent_rgb_bias) if same_latents and family.latent_rgb_bias else None
    scaling = float(sidecar.get("scaling_factor", spec.vae_config.get("scaling_factor", family.scaling_factor)))
    vae.register_to_config(scaling_factor=scaling)
    vae_scale = 2 ** (spec.vae_levels - 1)
    if vae_scale != family.vae_scale_factor and "native_size" not in sidecar:
        log.warning("%s: its VAE downscales %dx, not %s's %dx, and no sidecar states its native size; assuming %d px "
                    "(add %s with \"native_size\" if images come out as noise)", path, vae_scale, family.label,
                    family.vae_scale_factor, family.native_size, sidecar_name(path))
    return LoadedModel(
        name=name,
        path=path,
        family=family.family,
        prediction_type=prediction,
        unet=unet,
        vae=vae,
        text_encoders=[wrap_text_encoder(m, encoder_settings(layout))
                       for m, layout in zip(texts, family.text_encoders, strict=True)],
        native_size=int(sidecar.get("native_size", family.native_size)),
        vae_scale_factor=vae_scale,
        latent_channels=spec.latent_channels,
        scaling_factor=scaling,
        latent_rgb_factors=sidecar.get("latent_rgb_factors", factors),
        latent_rgb_bias=sidecar.get("latent_rgb_bias", bias),
        family_spec=family,
        dtype=precision.unet,
        device=torch.device(device),
        precision=precision,
        unet_config=dict(spec.unet_config),
        vae_config=dict(spec.vae_config),
        text_encoder_configs=[dict(t.config) for t in spec.text_encoders],
        sidecar=dict(sidecar),
    )


def sidecar_name(path: Path) -> str:
    """The sidecar file name for `path`, for messages."""
    from difusi.models.sidecar import sidecar_path

    return sidecar_path(path).name


# ----------------------------------------------------------------------------- diffusers folders


def _component_config(folder: Path) -> dict[str, Any]:
    """A component's config.json without bookkeeping keys (and without a stored dtype: the caller picks it)."""
    drop = ("dtype", "torch_dtype", "architectures", "transformers_version")
    return {k: v for k, v in read_json(folder / "config.json").items() if not k.startswith("_") and k not in drop}


def _load_diffusers_folder(root: Path, device: str | torch.device, precision: Precision) -> LoadedModel:
    """A diffusers pipeline folder: configs from its JSON files, weights from its component folders."""
    index = read_json(root / "model_index.json")
    for part in ("unet", "vae"):
        if not (root / part / "config.json").is_file():
            raise CheckpointError(f"{root}: diffusers folder without {part}/config.json")
    sidecar = read_sidecar(root)
    unet_config = _component_config(root / "unet") | sidecar.get("unet", {})
    vae_config = _component_config(root / "vae") | sidecar.get("vae", {})
    family = detect_diffusers(root, index, unet_config)
    def cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}

    unet = _finish(_build_and_adopt(_unet_class(), unet_config, cast(read_component_state_dict(root / "unet"), precision.unet),
                                  f"{root} UNet"), device)
    vae = _finish(_build_and_adopt(_vae_class(), vae_config, cast(read_component_state_dict(root / "vae"), precision.vae),
                                 f"{root} VAE"), device)
    specs, texts = [], []
    for layout in family.text_encoders:
        folder = layout.diffusers_folder
        config = _component_config(root / folder) | sidecar.get("text_encoder", {})
        spec = TextEncoderSpec(kind="clip", config=config, with_projection=layout.with_projection)
        specs.append(spec)
        texts.append(_finish(_build_text_encoder(spec, cast(read_component_state_dict(root / folder), precision.text_encoder),
                                                 f"{root}/{folder}"), device))
    scheduler = root / "scheduler" / "scheduler_config.json"
    prediction = sidecar.get("prediction_type") or (read_json(scheduler).get("prediction_type") if scheduler.is_file() else None)
    levels = len(vae_config["block_out_channels"])
    spec = ModelSpec(family.family, unet_config, vae_config, specs, levels, vae_config.get("latent_channels", 4),
                     family_spec=family)
    return _assemble(root, sidecar.get("name") or root.name, spec, prediction or family.prediction_type, unet, vae, texts,
                     sidecar, device, precision)


def free_model(model: LoadedModel | None) -> None:
    """Drop a model's modules and collect, so its memory is returned before the next one loads."""
    if model is None:
        return
    model.derived.clear()  # e.g. a compiled UNet graph (about a UNet's size again) goes with its model
    model.unet = model.vae = None
    model.text_encoders = []
    gc.collect()

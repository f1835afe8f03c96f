"""difusi's own CLIP text encoder: a drop-in for transformers 5's `CLIPTextModel` / `CLIPTextModelWithProjection`
as Stable Diffusion uses them, importing nothing but torch.

The network is CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; OpenAI `clip/model.py`): token + learned position embeddings, pre-LayerNorm residual blocks
of causal multi-head self-attention and a two-layer MLP, a final LayerNorm, the pooled state at the end-of-text
token and (SDXL's OpenCLIP bigG) a bias-free projection of it. Module names, nesting and registration order follow
transformers 5.x `models/clip/modeling_clip.py` (`CLIPTextEmbeddings`, `CLIPAttention`, `CLIPMLP`,
`CLIPEncoderLayer`, `CLIPEncoder`, `CLIPTextModel`, `CLIPTextModelWithProjection`), so `state_dict()` keys and
shapes, `named_modules()` paths (LoRA layer names) and the loader's key conversions are transformers' for the same
config. As in transformers 5, `CLIPTextModel` has no `text_model.` level (its modules sit at the top) while
`CLIPTextModelWithProjection` keeps one (`text_model.*` plus `text_projection`).

Behaviour reproduced from transformers 5 (what difusi reads):

* attention is `F.scaled_dot_product_attention` with the causal mask (transformers' "sdpa" implementation:
  `is_causal=True` without a padding mask, else a boolean causal-and-padding mask), scale `head_dim ** -0.5`;
* activations: "quick_gelu" `x * sigmoid(1.702 x)` (OpenAI CLIP), "gelu" exact erf GELU (OpenCLIP), and the
  tanh approximation under "gelu_new" / "gelu_pytorch_tanh";
* `hidden_states` (with `output_hidden_states=True`): the embeddings' output, then every layer's output, the last
  one *before* the final LayerNorm (num_hidden_layers + 1 entries); `last_hidden_state` is after it;
* `pooler_output`: the final-LayerNorm state at the first position whose id is `eos_token_id`; with the legacy
  `eos_token_id == 2` (configs from before transformers PR #24773) at the position of the largest id (argmax);
* `text_embeds` (WithProjection): `text_projection(pooled)`; its output also carries `pooler_output`.

`get_input_embeddings()` returns the token `nn.Embedding`, which every forward calls (forward hooks on it see the
token embeddings, as textual-inversion fixes need); every other part is reached by calling its module too, so
difusi's offload hooks (`difusi.models.offload`) fire exactly as on transformers' classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difusi.models.layers import first_device, first_dtype

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextModelOutput",
    "TextModelOutput",
    "text_model_class",
]


class CLIPTextConfig:
    """The fields of transformers 5's `CLIPTextConfig` (same defaults) with attribute access.

    Unknown keys (a diffusers folder's `config.json` carries `dropout`, `model_type`, ...) are kept as attributes,
    as transformers keeps them. `_attn_implementation` is "sdpa", the only attention this module has; setting it
    to anything else raises at forward time rather than silently computing something different.
    """

    DEFAULTS: Mapping[str, Any] = {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "projection_dim": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": 1,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        values = {**self.DEFAULTS, **(config or {}), **kwargs}
        self._attn_implementation = str(values.pop("_attn_implementation", None) or "sdpa")
        for key, value in values.items():
            if not key.startswith("_"):
                setattr(self, key, value)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

    def to_dict(self) -> dict[str, Any]:
        """The public fields as a plain dict (what `CLIPTextConfig(**d)` rebuilds)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def keys(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __repr__(self) -> str:
        return f"CLIPTextConfig({self.to_dict()!r})"


def _config(config: CLIPTextConfig | Mapping[str, Any] | Any | None, kwargs: Mapping[str, Any]) -> CLIPTextConfig:
    """A `CLIPTextConfig` from ours, a dict, or any object with the fields (a transformers `CLIPTextConfig`)."""
    if isinstance(config, CLIPTextConfig) and not kwargs:
        return config
    if config is not None and not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        config = to_dict() if callable(to_dict) else dict(vars(config))
    return CLIPTextConfig(config, **kwargs)


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation `x * sigmoid(1.702 x)` (transformers `QuickGELUActivation`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GELU(nn.Module):
    """GELU, exact (erf) or the tanh approximation (transformers `GELUActivation` / `NewGELUActivation`)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


def _activation(name: str) -> nn.Module:
    makers = {
        "quick_gelu": QuickGELU,
        "gelu": GELU,
        "gelu_new": lambda: GELU("tanh"),
        "gelu_pytorch_tanh": lambda: GELU("tanh"),
        "relu": nn.ReLU,
    }
    try:
        return makers[name]()
    except KeyError:
        raise ValueError(f"unsupported CLIP hidden_act {name!r}; known: {sorted(makers)}") from None


def _embedding(count: int, width: int) -> nn.Embedding:
    """`nn.Embedding` with its usual N(0, 1) start, except on the meta device (the loader's build before it assigns
    the checkpoint's tensors): there `normal_` is one of the few ops torch runs through its Python reference
    implementations, whose first use imports torch._refs / torch._decomp (about a second)."""
    weight = torch.empty(count, width)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(count, width, _weight=weight)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding (`position_ids`: a non-persistent buffer)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = _embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[-1] if input_ids is not None else inputs_embeds.shape[-2]
        limit = self.position_embedding.weight.shape[0]
        if length > limit:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {limit}")
        if position_ids is None:
            position_ids = self.position_ids[:, :length]
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        return inputs_embeds + self.position_embedding(position_ids)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; projections registered k, v, q, out as in transformers."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = float(config.attention_dropout or 0.0)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask`: None (plain causal attention) or a boolean `[B, 1, T, T]` mask, True = attend."""
        if self.config._attn_implementation != "sdpa":
            raise ValueError(f"difusi's CLIP has only 'sdpa' attention, not {self.config._attn_implementation!r}")
        batch, length = hidden_states.shape[:-1]
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attention_mask is None and length > 1, scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(batch, length, -1).contiguous()
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.activation_fn = _activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        hidden_states = inputs_embeds
        states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
            if states is not None:
                states.append(hidden_states)
        return hidden_states, None if states is None else tuple(states)


class _Output:
    """transformers' `ModelOutput` access: attributes, `out["name"]`, and `out[0]` / `to_tuple()` over the fields
    that are set, in transformers' order (`_TUPLE`; an extra field outside it is reachable by name only)."""

    _TUPLE: tuple[str, ...] = ()

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, k) for k in self._TUPLE) if v is not None)

    def keys(self) -> list[str]:
        return [k for k in self._TUPLE if getattr(self, k) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class TextModelOutput(_Output):
    """transformers' `BaseModelOutputWithPooling` fields as `CLIPTextModel` fills them."""

    _TUPLE = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: None = None  # sdpa never returns attention weights


@dataclass
class CLIPTextModelOutput(_Output):
    """transformers' `CLIPTextModelOutput` fields, plus the `pooler_output` the projection was applied to."""

    _TUPLE = ("text_embeds", "last_hidden_state", "hidden_states", "attentions")

    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    pooler_output: torch.Tensor | None = None


class _Module(nn.Module):
    """`config`, `dtype` and `device` as transformers' `PreTrainedModel` has them."""

    config: CLIPTextConfig

    @property
    def dtype(self) -> torch.dtype:
        return first_dtype(self)

    @property
    def device(self) -> torch.device:
        return first_device(self)


def _causal_mask(attention_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor | None:
    """None (SDPA's own `is_causal`) without a padding mask; else causal AND "key not padding", `[B, 1, T, T]`."""
    if attention_mask is None:
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]


class CLIPTextModel(_Module):
    """transformers 5 `CLIPTextModel`: `embeddings`, `encoder`, `final_layer_norm` at the top level."""

    def __init__(self, config: CLIPTextConfig | Mapping[str, Any] | Any | None = None, **kwargs: Any):
        super().__init__()
        self.config = _config(config, kwargs)
        self.embeddings = CLIPTextEmbeddings(self.config)
        self.encoder = CLIPEncoder(self.config)
        self.final_layer_norm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)
        self.eos_token_id = self.config.eos_token_id

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, **kwargs: Any) -> CLIPTextModel:
        return cls(config, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.token_embedding = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                **_: Any) -> TextModelOutput:
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        mask = _causal_mask(attention_mask, input_ids.shape[-1], hidden_states.device)
        last, states = self.encoder(hidden_states, mask, output_hidden_states=bool(output_hidden_states))
        last = self.final_layer_norm(last)
        rows = torch.arange(last.shape[0], device=last.device)
        ids = input_ids.to(dtype=torch.int, device=last.device)
        if self.eos_token_id == 2:  # legacy configs: the end-of-text token is the largest id in each sequence
            positions = ids.argmax(dim=-1)
        else:  # the first end-of-text position (padding may use the same id)
            positions = (ids == self.eos_token_id).int().argmax(dim=-1)
        return TextModelOutput(last_hidden_state=last, pooler_output=last[rows, positions], hidden_states=states)


class CLIPTextModelWithProjection(_Module):
    """transformers 5 `CLIPTextModelWithProjection`: a `text_model` (`CLIPTextModel`) and a bias-free
    `text_projection` of its pooled output."""

    def __init__(self, config: CLIPTextConfig | Mapping[str, Any] | Any | None = None, **kwargs: Any):
        super().__init__()
        self.config = _config(config, kwargs)
        self.text_model = CLIPTextModel(self.config)
        self.text_projection = nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, **kwargs: Any) -> CLIPTextModelWithProjection:
        return cls(config, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.embeddings.token_embedding = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                **_: Any) -> CLIPTextModelOutput:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              output_hidden_states=output_hidden_states)
        return CLIPTextModelOutput(text_embeds=self.text_projection(out.pooler_output),
                                   last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                                   pooler_output=out.pooler_output)


def text_model_class(with_projection: bool) -> type[CLIPTextModel] | type[CLIPTextModelWithProjection]:
    """The class the loader builds for one text encoder (SDXL's bigG: with projection)."""
    return CLIPTextModelWithProjection if with_projection else CLIPTextModel


def init_weights(module: nn.Module, seed: int | None = None) -> None:
    """transformers' CLIP initialisation (`CLIPPreTrainedModel._init_weights`): normal(0.02) embeddings, scaled
    normal projections, zero biases, unit LayerNorms. For training from scratch (difusi-mini); loading replaces it."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    model = module.text_model if isinstance(module, CLIPTextModelWithProjection) else module
    config = model.config
    factor = float(config.initializer_factor or 1.0)
    width, layers = config.hidden_size, config.num_hidden_layers

    def normal(tensor: torch.Tensor, std: float) -> None:
        with torch.no_grad():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)
    normal(model.embeddings.token_embedding.weight, factor * 0.02)
    normal(model.embeddings.position_embedding.weight, factor * 0.02)
    in_std = width**-0.5 * (2 * layers) ** -0.5 * factor
    for layer in model.encoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
            normal(proj.weight, in_std)
        normal(attention.out_proj.weight, width**-0.5 * factor)
        normal(mlp.fc1.weight, (2 * width) ** -0.5 * factor)
        normal(mlp.fc2.weight, in_std)
    if isinstance(module, CLIPTextModelWithProjection):
        normal(module.text_projection.weight, width**-0.5 * factor)


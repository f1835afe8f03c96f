"""Text encoders of each family: shipped tokenizers and the per-family `ClipTextEncoder` settings.

All CLIP variants SD uses share OpenAI's BPE vocabulary (49,408 tokens), shipped in
`assets/tokenizers/clip`. They differ in padding: OpenAI CLIP (SD1, SDXL's first encoder) pads with
`<|endoftext|>`; OpenCLIP (SD2, SDXL's bigG) pads with token 0 ("!"), as its tokenizer zero-fills.
Layer choice per family (A1111 / Stability configs): SD1 last layer + final LayerNorm; SD2
penultimate layer + final LayerNorm; SDXL penultimate layer of both, no final LayerNorm, plus the
bigG pooled (projected) output. Those settings live in the family table
(`difusi.models.families.TextEncoderLayout`); `encoder_settings` turns one into what the pipeline reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from difusi.models.families import ARCHITECTURES, OPENCLIP_PAD_ID, TextEncoderLayout, base_spec

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizers" / "clip"
OPENCLIP_PAD_TOKEN = "!"  # id 0 in the CLIP vocabulary (OPENCLIP_PAD_ID)
MAX_LENGTH = 77


@dataclass(frozen=True)
class EncoderSettings:
    """How the pipeline reads one text encoder (see `difusi.prompts.conditioning.ClipTextEncoder`)."""

    pad_token_id: int
    hidden_layer: int
    final_layer_norm: bool
    pooled: bool


def encoder_settings(layout: TextEncoderLayout) -> EncoderSettings:
    """The reading rules of one text encoder of a family record."""
    return EncoderSettings(layout.pad_token_id, layout.hidden_layer, layout.final_layer_norm, layout.pooled)


# Per architecture name, derived from the family table (kept for callers that only know "sd1"/"sd2"/"sdxl").
FAMILY_ENCODERS: dict[str, list[EncoderSettings]] = {
    family: [encoder_settings(layout) for layout in base_spec(family).text_encoders] for family in ARCHITECTURES
}


@lru_cache(maxsize=2)
def load_tokenizer(openclip: bool = False) -> Any:
    """The shipped CLIP BPE tokenizer (difusi's own, `difusi.prompts.bpe`: the same ids as transformers'
    `CLIPTokenizer`); `openclip=True` pads with token 0 like OpenCLIP. Cached."""
    from difusi.prompts.bpe import ClipTokenizer

    pad = {"pad_token": OPENCLIP_PAD_TOKEN} if openclip else {}
    # model_max_length as in SD's tokenizer configs (77)
    return ClipTokenizer(TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt", model_max_length=MAX_LENGTH,
                         **pad)


@lru_cache(maxsize=2)
def reference_tokenizer(openclip: bool = False) -> Any:
    """transformers' `CLIPTokenizer` on the same files: the reference the tests compare with, and what diffusers'
    pipelines and `save_pretrained` need (`difusi.models.synthetic`)."""
    from transformers import CLIPTokenizer

    pad = {"pad_token": OPENCLIP_PAD_TOKEN} if openclip else {}
    files = {"vocab": str(TOKENIZER_DIR / "vocab.json"), "merges": str(TOKENIZER_DIR / "merges.txt")}
    return CLIPTokenizer(**files, model_max_length=MAX_LENGTH, **pad)


@dataclass
class RawTextEncoder:
    """Stand-in with ClipTextEncoder's constructor fields, used only if difusi.prompts is not importable."""

    model: Any
    tokenizer: Any
    pad_token_id: int
    hidden_layer: int = -1
    final_layer_norm: bool = True
    pooled: bool = False


def wrap_text_encoder(model: Any, settings: EncoderSettings) -> Any:
    """The pipeline-facing encoder object for one transformers CLIP model (the one place that builds it)."""
    tokenizer = load_tokenizer(openclip=settings.pad_token_id == OPENCLIP_PAD_ID)
    try:
        from difusi.prompts.conditioning import ClipTextEncoder
    except ImportError:
        ClipTextEncoder = RawTextEncoder  # noqa: N806  (prompts package not present yet)
    return ClipTextEncoder(
        model,
        tokenizer,
        settings.pad_token_id,
        hidden_layer=settings.hidden_layer,
        final_layer_norm=settings.final_layer_norm,
        pooled=settings.pooled,
    )

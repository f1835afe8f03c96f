"""Prompt text -> text-encoder conditioning, with A1111's emphasis, chunking and schedules.

The flow for one prompt (A1111 ``modules/sd_hijack_clip.py`` + ``prompt_parser.py``):
``get_prompt_schedule`` gives the distinct texts of the prompt; each text becomes 77-token
chunks (:mod:`difusi.prompts.tokens`); every chunk goes through each text encoder; the chosen
hidden layer is scaled by the tokens' emphasis weights and rescaled to keep its mean
("Original" emphasis); chunks are concatenated along the sequence (77*k positions) and the
encoders' outputs along the features (SDXL: 768 + 1280 = 2048).

Faithful to A1111 where it is surprising:

* The emphasis mean is taken over the whole batch a chunk is encoded in: A1111 encodes all
  texts of one prompt's schedule (one per schedule entry, repeats included) as one batch, so
  ``[a:(b:1.5):0.5]`` rescales the ``a`` text too. :func:`encode_texts` reproduces this
  (each distinct text runs through the network once; repeats count in the mean).
* SDXL's pooled vector is the projected pooled output of the *first* chunk only.
* Texts of one batch are padded to the same chunk count with empty chunks (``[BOS, EOS, pad...]``).
* Cond and uncond with different chunk counts are padded with the encoding of the empty prompt
  (:func:`pad_to_same_length`, A1111's ``pad_cond``).

Textual-inversion embeddings: while an :class:`EncoderEmbeddings` is set on ``ClipTextEncoder.embeddings``
(``difusi.networks.embeddings.attach`` does that for one job), :meth:`ClipTextEncoder.tokenize` marks the
embeddings' positions (:class:`~difusi.prompts.tokens.ChunkFix`) and :meth:`ClipTextEncoder.encode_ids`
writes their vectors over the token-embedding output at those positions with a forward hook that lives
for that one call (A1111 ``sd_hijack.py EmbeddingsWithFixes.forward``). Emphasis then applies to them as
to any token. Without embeddings nothing here changes.

Not reproduced: A1111 applies "Clip skip" only to SD1 (and to SDXL's CLIP-L behind an option);
here ``clip_skip`` moves every encoder's layer back. Pass ``clip_skip=1`` for SD2/SDXL to match A1111.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from difusi.errors import ParamError
from difusi.prompts.parser import get_prompt_schedule
from difusi.prompts.tokens import ChunkFix, EmbeddingLookup, TokenChunk, special_tokens, tokenize_prompt

__all__ = [
    "ClipTextEncoder",
    "EncoderEmbeddings",
    "Conditioning",
    "encode_texts",
    "encode_prompt",
    "encode_prompt_schedule",
    "pad_to_same_length",
    "conditioning_at",
    "apply_emphasis",
    "sdxl_time_ids",
]

CHUNK_POSITIONS = 77


class EncoderEmbeddings(EmbeddingLookup, Protocol):
    """Textual-inversion embeddings as one text encoder sees them (see ``difusi.networks.embeddings``)."""

    def vectors_for(self, embedding: Any) -> Tensor:
        """``[n, D]`` vectors of ``embedding`` for this encoder (SDXL: its ``clip_l`` or ``clip_g`` part)."""
        ...

    def record_used(self, embeddings: Sequence[Any]) -> None:
        """Called once per :meth:`ClipTextEncoder.encode_batch` that used embeddings (A1111: per forward)."""
        ...


@dataclass
class Conditioning:
    """Text conditioning for a batch of B images.

    Attributes:
        context: ``[B, 77*k, D]`` cross-attention states (k chunks; D summed over encoders).
        pooled: ``[B, P]`` pooled text embedding (SDXL's ``text_embeds``) or None.
        empty_chunk: ``[1, 77, D]`` encoding of the empty prompt with the same encoders and clip
            skip, used by :func:`pad_to_same_length`; None if unknown.
    """

    context: Tensor
    pooled: Tensor | None = None
    empty_chunk: Tensor | None = None

    @property
    def chunks(self) -> int:
        """Number of 77-token chunks in ``context``."""
        return self.context.shape[1] // CHUNK_POSITIONS

    def zeros_like(self) -> Conditioning:
        """All-zero context and pooled of the same shapes (``empty_chunk`` kept for padding).

        SDXL's unconditional input when the negative prompt is empty: A1111 zeroes the text
        embeddings then (``force_zero_embeddings``), diffusers too (``force_zeros_for_empty_prompt``).
        """
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return Conditioning(torch.zeros_like(self.context), pooled, self.empty_chunk)

    def repeat(self, batch_size: int) -> Conditioning:
        """The same conditioning for ``batch_size`` images (repeats along dim 0)."""
        pooled = None if self.pooled is None else self.pooled.repeat(batch_size, 1)
        return Conditioning(self.context.repeat(batch_size, 1, 1), pooled, self.empty_chunk)


class ClipTextEncoder:
    """One CLIP text encoder as Stable Diffusion uses it.

    Args:
        model: a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection``.
        tokenizer: a transformers ``CLIPTokenizer`` (BPE vocabulary shared by all SD encoders).
        pad_token_id: id that fills a chunk after its EOS (49407 for CLIP ViT-L, 0 for OpenCLIP).
        hidden_layer: which ``hidden_states`` entry to use (-1 last, -2 penultimate, ...).
        final_layer_norm: apply the model's final LayerNorm to that layer (SD1/SD2 yes, SDXL no).
        pooled: this encoder provides the pooled embedding (SDXL's OpenCLIP bigG).

    Family settings: SD1 ``(-1, True, False, pad 49407)``; SD2 ``(-2, True, False, pad 0)`` (or -1
    on a truncated 23-layer model); SDXL CLIP-L ``(-2, False, False, pad 49407)`` + bigG
    ``(-2, False, True, pad 0)``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pad_token_id: int,
        hidden_layer: int = -1,
        final_layer_norm: bool = True,
        pooled: bool = False,
    ):
        self.num_layers = int(model.config.num_hidden_layers)
        if not -self.num_layers <= hidden_layer <= -1:
            raise ValueError(f"hidden_layer must be in -1..-{self.num_layers} for this model, got {hidden_layer}")
        self.model = model
        self.tokenizer = tokenizer
        self.pad_token_id = int(pad_token_id)
        self.hidden_layer = hidden_layer
        self.final_layer_norm = final_layer_norm
        self.pooled = pooled
        self.special = special_tokens(tokenizer, pad_token_id)
        self._empty_states: dict[int, Tensor] = {}  # clip_skip -> [1, 77, D]; the model is frozen
        self.embeddings: EncoderEmbeddings | None = None
        """Textual-inversion embeddings for the current job (set and cleared by ``networks.embeddings.attach``)."""

    @property
    def width(self) -> int:
        """Feature width D of the context this encoder produces."""
        return int(self.model.config.hidden_size)

    def max_clip_skip(self) -> int:
        """Largest clip skip that still leaves one transformer layer."""
        return self.num_layers + self.hidden_layer + 1

    def tokenize(self, text: str) -> list[TokenChunk]:
        """77-token chunks of one resolved prompt text (with embedding fixes while embeddings are attached)."""
        return tokenize_prompt(text, self.tokenizer, self.pad_token_id, embeddings=self.embeddings)

    def empty_chunk(self) -> TokenChunk:
        """The chunk A1111 pads a batch with: BOS, then EOS, then padding; all weights 1."""
        ids = (self.special.bos, self.special.eos, *[self.special.pad] * (CHUNK_POSITIONS - 2))
        return TokenChunk(ids, (1.0,) * CHUNK_POSITIONS)

    def layer_for(self, clip_skip: int) -> int:
        """The ``hidden_states`` index used at this clip skip (1 = the encoder's own layer)."""
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= self.max_clip_skip():
            raise ParamError("clip_skip", f"must be an integer from 1 to {self.max_clip_skip()}, got {clip_skip!r}")
        return self.hidden_layer - (clip_skip - 1)

    def encode_empty(self, clip_skip: int = 1) -> Tensor:
        """``[1, 77, D]`` states of :meth:`empty_chunk` (the empty prompt), cached per clip skip."""
        if clip_skip not in self._empty_states:
            ids = torch.tensor([self.empty_chunk().ids], dtype=torch.long)
            self._empty_states[clip_skip] = self.encode_ids(ids, clip_skip)[0]
        return self._empty_states[clip_skip]

    @torch.no_grad()
    def encode_ids(
        self, ids: Tensor, clip_skip: int = 1, fixes: Sequence[Sequence[ChunkFix]] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Run the network on ``[B, 77]`` token ids; returns (hidden states ``[B, 77, D]``, pooled or None).

        ``fixes[i]`` are row i's textual-inversion embeddings: their vectors replace the token embeddings
        at ``offset + 1 ..`` (needs :attr:`embeddings`). No emphasis here: these are the raw states of the
        chosen layer.
        """
        layer = self.layer_for(clip_skip)
        use_last = layer == -1 and self.final_layer_norm
        hook = None
        if fixes is not None and any(fixes):
            hook = self.model.get_input_embeddings().register_forward_hook(self._fixes_hook(fixes))
        try:
            output = self.model(input_ids=ids.to(_device_of(self.model)), output_hidden_states=not use_last)
        finally:
            if hook is not None:
                hook.remove()
        if use_last:
            states = output.last_hidden_state  # = final_layer_norm(hidden_states[-1])
        else:
            states = output.hidden_states[layer]
            if self.final_layer_norm:
                states = _final_layer_norm(self.model)(states)
        pooled = None
        if self.pooled:
            pooled = output.text_embeds if getattr(output, "text_embeds", None) is not None else output.pooler_output
        return states, pooled

    def _fixes_hook(self, batch_fixes: Sequence[Sequence[ChunkFix]]) -> Any:
        """A forward hook for the token-embedding layer that writes the embeddings' vectors into its output.

        A1111 ``EmbeddingsWithFixes.forward``: row b, fix (offset, e) -> positions ``offset + 1 ..`` get
        e's vectors, at most up to the chunk's last position (``min(T - offset - 1, n)`` of them).
        """
        if self.embeddings is None:
            raise ValueError("chunks carry textual-inversion fixes but no embeddings are attached to this encoder")
        embeddings = self.embeddings

        def hook(_module: torch.nn.Module, _args: Any, output: Tensor) -> Tensor:
            output = output.clone()
            for row, fixes in enumerate(batch_fixes):
                for fix in fixes:
                    vectors = embeddings.vectors_for(fix.embedding).to(device=output.device, dtype=output.dtype)
                    start = fix.offset + 1  # +1: the chunk's BOS
                    count = min(output.shape[1] - start, vectors.shape[0])
                    output[row, start : start + count] = vectors[:count]
            return output

        return hook

    def encode_batch(
        self, batch: Sequence[Sequence[TokenChunk]], clip_skip: int = 1, counts: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Encode B chunk lists as one A1111 batch: ``[B, 77*k, D]`` and pooled ``[B, P]`` (first chunk).

        Shorter lists are padded with :meth:`empty_chunk`. Emphasis is applied per chunk over the
        whole batch, each item counted ``counts[i]`` times in the mean (default once each).
        """
        chunk_count = max(len(chunks) for chunks in batch)
        counts = [1] * len(batch) if counts is None else list(counts)
        contexts, pooled = [], None
        used: dict[str, Any] = {}  # A1111 forward's used_embeddings: by name, in order of first use
        for index in range(chunk_count):
            column = [chunks[index] if index < len(chunks) else self.empty_chunk() for chunks in batch]
            ids = torch.tensor([chunk.ids for chunk in column], dtype=torch.long)
            fixes = [chunk.fixes for chunk in column]
            for chunk_fixes in fixes:
                for fix in chunk_fixes:
                    used.setdefault(fix.embedding.name, fix.embedding)
            states, chunk_pooled = self.encode_ids(ids, clip_skip, fixes)
            weights = torch.tensor([chunk.weights for chunk in column], dtype=states.dtype, device=states.device)
            contexts.append(apply_emphasis(states, weights, counts))
            if index == 0:
                pooled = chunk_pooled
        if used and self.embeddings is not None:
            self.embeddings.record_used(list(used.values()))
        return torch.cat(contexts, dim=1), pooled


def apply_emphasis(states: Tensor, weights: Tensor, counts: Sequence[int] | None = None) -> Tensor:
    """A1111's "Original" emphasis: scale each position by its weight, then restore the mean.

    ``states`` is ``[B, T, D]``, ``weights`` ``[B, T]``. The mean is over all elements of the
    batch, item i counted ``counts[i]`` times (A1111 encodes repeated schedule texts repeatedly).
    With all weights 1 the states come back unchanged.
    """
    if bool((weights == 1).all()):
        return states
    multiplicity = torch.tensor(
        [1] * states.shape[0] if counts is None else list(counts), dtype=states.dtype, device=states.device
    )

    def batch_mean(tensor: Tensor) -> Tensor:
        return (tensor.mean(dim=(1, 2)) * multiplicity).sum() / multiplicity.sum()

    original_mean = batch_mean(states)
    weighted = states * weights.unsqueeze(-1)
    new_mean = batch_mean(weighted)
    if new_mean == 0:  # only reachable with weights that cancel out; keep the plain product
        return weighted
    return weighted * (original_mean / new_mean)


def encode_texts(encoders: Sequence[ClipTextEncoder], texts: Sequence[str], clip_skip: int = 1) -> list[Conditioning]:
    """Encode ``texts`` as one A1111 batch; one :class:`Conditioning` (B=1) per entry of ``texts``.

    Repeated texts run through the networks once but count once per repeat in the emphasis mean.
    All results have the same chunk count. With several encoders (SDXL) the contexts are
    concatenated along the feature dim; ``pooled`` comes from the encoder marked ``pooled=True``.
    """
    if not encoders or not texts:
        raise ValueError("encode_texts needs at least one text encoder and one text")
    multiplicity = Counter(texts)
    distinct = list(multiplicity)
    counts = [multiplicity[text] for text in distinct]
    contexts, pooled = [], None
    for encoder in encoders:
        context, encoder_pooled = encoder.encode_batch([encoder.tokenize(t) for t in distinct], clip_skip, counts)
        contexts.append(context)
        pooled = encoder_pooled if encoder_pooled is not None else pooled
    _check_same_chunk_count(contexts)
    context = torch.cat(contexts, dim=-1)
    empty = _empty_chunk_encoding(encoders, clip_skip)
    by_text = {
        text: Conditioning(context[i : i + 1], None if pooled is None else pooled[i : i + 1], empty)
        for i, text in enumerate(distinct)
    }
    return [by_text[text] for text in texts]


def encode_prompt(encoders: Sequence[ClipTextEncoder], text: str, clip_skip: int = 1) -> Conditioning:
    """Encode one prompt text (no schedule resolution): ``context [1, 77*k, D]``, ``pooled [1, P]``."""
    return encode_texts(encoders, [text], clip_skip)[0]


def encode_prompt_schedule(
    encoders: Sequence[ClipTextEncoder], prompt: str, steps: int, clip_skip: int = 1, hires_steps: int | None = None
) -> list[tuple[int, Conditioning]]:
    """``[(end_step, Conditioning), ...]`` for a prompt with editing/alternation (see
    :func:`~difusi.prompts.parser.get_prompt_schedule`). Each distinct text is encoded once; entries
    with the same text share one :class:`Conditioning`. Pick per step with :func:`conditioning_at`.
    ``hires_steps``: the hires-fix pass's schedule (see ``get_prompt_schedule``).
    """
    schedule = get_prompt_schedule(prompt, steps, hires_steps)
    encoded = encode_texts(encoders, [text for _, text in schedule], clip_skip)
    return [(end_step, conditioning) for (end_step, _), conditioning in zip(schedule, encoded, strict=True)]


def conditioning_at(schedule: Sequence[tuple[int, Conditioning]], step: int) -> Conditioning:
    """The conditioning for 0-based schedule step ``step``: the first entry with ``step <= end_step``.

    This is A1111's ``reconstruct_cond_batch`` rule, so ``[a:b:3]`` uses ``a`` for steps 0..3. The step is
    the CFG denoiser's model-call index (see ``difusi.pipeline._ScheduledCFG``), which for one-call-per-step
    samplers is the sampler step. Past the last ``end_step`` the *first* entry applies, as in A1111
    (``target_index = 0`` when no entry matches): only samplers that make more model calls than the schedule
    has steps get there (DPM adaptive), and A1111's images for them come from this rule.
    """
    if not schedule:
        raise ValueError("empty conditioning schedule")
    for end_step, conditioning in schedule:
        if step <= end_step:
            return conditioning
    return schedule[0][1]


def pad_to_same_length(a: Conditioning, b: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Give cond and uncond the same chunk count by appending empty-prompt encodings to the shorter.

    A1111's ``pad_cond`` (option "pad prompt/negative prompt to be same length"): the shorter
    context gets ``difference`` copies of the encoded empty prompt. Pooled vectors are unchanged.
    """
    if a.context.shape[1] == b.context.shape[1]:
        return a, b
    empty = a.empty_chunk if a.empty_chunk is not None else b.empty_chunk
    if empty is None:
        raise ValueError("cannot pad conditioning: neither side carries an empty_chunk encoding")
    longer = max(a.context.shape[1], b.context.shape[1])
    return _padded(a, empty, longer), _padded(b, empty, longer)


def _padded(conditioning: Conditioning, empty: Tensor, length: int) -> Conditioning:
    missing = (length - conditioning.context.shape[1]) // CHUNK_POSITIONS
    if missing == 0:
        return conditioning
    batch = conditioning.context.shape[0]
    padding = empty.to(conditioning.context).repeat(batch, missing, 1)
    context = torch.cat([conditioning.context, padding], dim=1)
    return Conditioning(context, conditioning.pooled, conditioning.empty_chunk)


def sdxl_time_ids(
    original_size: tuple[int, int],
    crop_coords: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """SDXL's micro-conditioning vector ``[[orig_h, orig_w, crop_top, crop_left, target_h, target_w]]``.

    Shape ``[1, 6]`` like diffusers' ``add_time_ids`` (Podell et al. 2023, "SDXL", sec. 2.2).
    Sizes are ``(height, width)``; ``target_size`` defaults to ``original_size``. A1111 uses the
    image size for both sizes and (0, 0) crop.
    """
    target_size = original_size if target_size is None else target_size
    for name, pair, minimum in (
        ("original_size", original_size, 1),
        ("crop_coords", crop_coords, 0),
        ("target_size", target_size, 1),
    ):
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
            raise ParamError(name, f"must be two integers >= {minimum} (height/top, width/left), got {pair!r}")
    return torch.tensor([[*original_size, *crop_coords, *target_size]], dtype=dtype)


def _check_same_chunk_count(contexts: list[Tensor]) -> None:
    lengths = {context.shape[1] for context in contexts}
    if len(lengths) > 1:
        raise ValueError(f"text encoders produced different sequence lengths {sorted(lengths)}; tokenizers disagree")


def _empty_chunk_encoding(encoders: Sequence[ClipTextEncoder], clip_skip: int) -> Tensor:
    """``[1, 77, D]``: the empty prompt through every encoder (weights 1, so no emphasis)."""
    return torch.cat([encoder.encode_empty(clip_skip) for encoder in encoders], dim=-1)


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _final_layer_norm(model: Any) -> torch.nn.Module:
    """transformers 5 ``CLIPTextModel`` holds it directly; ``...WithProjection`` under ``text_model``."""
    norm = getattr(model, "final_layer_norm", None)
    return norm if norm is not None else model.text_model.final_layer_norm

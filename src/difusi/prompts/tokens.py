"""Weighted prompt fragments -> CLIP token ids in 77-token chunks, the way A1111 builds them.

CLIP's text encoder sees at most 77 positions, so A1111 ("infinite prompt length",
``modules/sd_hijack_clip.py``) cuts a prompt into chunks of 75 tokens, wraps each as
``<|startoftext|> t1 .. t75 <|endoftext|>`` and encodes every chunk separately; the
conditioning is the chunks' encodings side by side (77*k positions). Rules reproduced here:

* Each ``(fragment, weight)`` from :func:`~difusi.prompts.parser.parse_prompt_attention` is
  BPE-tokenized on its own; every token keeps its fragment's weight, BOS/EOS/padding get 1.0.
* When a chunk is full and the prompt goes on, and the last comma in the chunk is at most
  ``comma_backtrack`` (A1111 default 20) tokens from its end, the tokens after that comma move
  to the next chunk, so a phrase is not cut in half ("comma padding backtrack").
* ``BREAK`` closes the current chunk (padding it); text after it starts a new chunk.
* Padding: the chunk is filled with ``<|endoftext|>``, and every position after the first
  ``<|endoftext|>`` is then set to the encoder's pad id (the same token for CLIP ViT-L/SD1,
  0 for the OpenCLIP encoders of SD2 and SDXL).
* An empty prompt gives one chunk ``[BOS, EOS, pad, ...]``; text never gives an empty chunk at
  the end, except what ``BREAK`` made.

Textual-inversion embeddings (only when an :class:`EmbeddingLookup` is passed; A1111
``sd_hijack_clip.py tokenize_line``, ``PromptChunkFix``):

* Inside each fragment's tokens, at every position, the embedding database is asked whether an
  embedding's name (its token ids) starts there (``EmbeddingDatabase.find_embedding_at_position``).
* The comma / backtrack / full-chunk checks run first, as for any token. Then, if the embedding's
  ``vector_count`` n does not fit in the chunk's remaining positions, the chunk is closed (padded)
  and the embedding starts the next one.
* It takes n positions with placeholder id 0 and the fragment's weight, and the chunk records a
  :class:`ChunkFix` ``(offset, embedding)``; the text encoder later replaces the token-embedding
  outputs at positions ``offset + 1 .. offset + n`` (the +1 is BOS) with the embedding's vectors.
* A1111 quirk reproduced: when the comma backtrack moves a chunk's tail to the next chunk, the
  fixes stay with the old chunk (A1111 moves tokens and multipliers, not ``chunk.fixes``). The old
  chunk's vectors then land on its EOS padding (clipped at position 76) and the moved placeholder
  ids are encoded as plain token 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from difusi.prompts.parser import BREAK, parse_prompt_attention

__all__ = [
    "CHUNK_TOKENS",
    "COMMA_BACKTRACK",
    "PLACEHOLDER_ID",
    "TokenChunk",
    "ChunkFix",
    "EmbeddingLookup",
    "TriggeredEmbedding",
    "SpecialTokens",
    "chunk_tokens",
    "tokenize_prompt",
    "special_tokens",
    "load_clip_tokenizer",
]

CHUNK_TOKENS = 75
"""Prompt tokens per chunk; with BOS and EOS a chunk is 77 positions."""

COMMA_BACKTRACK = 20
"""A1111's default "Prompt word wrap length limit" (``comma_padding_backtrack``)."""

PLACEHOLDER_ID = 0
"""Token id at an embedding's positions (A1111 ``tokenize_line``: ``chunk.tokens += [0] * emb_len``)."""


class TriggeredEmbedding(Protocol):
    """What chunking needs of an embedding: its name and how many positions it takes."""

    @property
    def name(self) -> str: ...

    @property
    def vector_count(self) -> int: ...


class EmbeddingLookup(Protocol):
    """Finds an embedding whose name's token ids start at ``tokens[offset]``.

    Returns ``(embedding, number of prompt tokens its name covers)`` or None (A1111
    ``EmbeddingDatabase.find_embedding_at_position``).
    """

    def find_at(self, tokens: Sequence[int], offset: int) -> tuple[TriggeredEmbedding, int] | None: ...


@dataclass(frozen=True)
class ChunkFix:
    """An embedding whose vectors replace the token embeddings at ``offset + 1 ..`` of a chunk (A1111
    ``PromptChunkFix``; ``offset`` counts prompt tokens, without the BOS)."""

    offset: int
    embedding: Any


@dataclass(frozen=True)
class TokenChunk:
    """One 77-position encoder input: token ids, the emphasis weight of each position, and the
    textual-inversion fixes to apply in it (none without embeddings)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[ChunkFix, ...] = ()


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a chunk is built from; ``comma`` is the id of ``,</w>`` (None: no backtracking)."""

    bos: int
    eos: int
    pad: int
    comma: int | None


def special_tokens(tokenizer: Any, pad_token_id: int) -> SpecialTokens:
    """Read BOS/EOS/comma ids from a transformers CLIP tokenizer; ``pad_token_id`` is the encoder's."""
    return SpecialTokens(
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=pad_token_id,
        comma=tokenizer.get_vocab().get(",</w>"),
    )


def tokenize_prompt(
    text: str,
    tokenizer: Any,
    pad_token_id: int,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingLookup | None = None,
) -> list[TokenChunk]:
    """Parse emphasis/BREAK in ``text`` and cut it into 77-token chunks (see module docstring).

    Args:
        text: one prompt text (already resolved by :func:`~difusi.prompts.parser.get_prompt_schedule`).
        tokenizer: a CLIP tokenizer (:func:`load_clip_tokenizer`, or transformers' ``CLIPTokenizer``).
        pad_token_id: the encoder's padding id (EOS for CLIP ViT-L, 0 for OpenCLIP).
        comma_backtrack: how far back (in tokens) a comma may be to move the tail of a full chunk.
        embeddings: textual-inversion embeddings to look for (None: plain tokens only).
    """
    fragments = parse_prompt_attention(text)
    # verbose=False: fragments longer than 77 tokens are expected here (they get chunked below)
    texts = [fragment for fragment, _ in fragments]
    token_lists = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    weighted = [
        (None if (fragment == BREAK and weight == -1.0) else ids, weight)
        for ids, (fragment, weight) in zip(token_lists, fragments, strict=True)
    ]
    special = special_tokens(tokenizer, pad_token_id)
    return chunk_tokens(weighted, special, comma_backtrack=comma_backtrack, embeddings=embeddings)


def chunk_tokens(
    fragments: Sequence[tuple[Sequence[int] | None, float]],
    special: SpecialTokens,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingLookup | None = None,
) -> list[TokenChunk]:
    """Cut weighted token lists into chunks; a fragment whose ids are ``None`` is a BREAK.

    This is the tokenizer-free core of :func:`tokenize_prompt` (A1111's ``tokenize_line``). Embedding
    names are matched inside one fragment only, as A1111 looks them up in each fragment's token list.
    """
    builder = _ChunkBuilder(special, comma_backtrack)
    for ids, weight in fragments:
        if ids is None:
            builder.close_chunk()
            continue
        tokens = [int(token) for token in ids]
        position = 0
        while position < len(tokens):
            found = None if embeddings is None else embeddings.find_at(tokens, position)
            if found is None:
                builder.add(tokens[position], float(weight))
                position += 1
                continue
            embedding, name_length = found
            builder.add_embedding(tokens[position], embedding, float(weight))
            position += name_length
    return builder.finish()


class _ChunkBuilder:
    def __init__(self, special: SpecialTokens, comma_backtrack: int):
        self.special = special
        self.comma_backtrack = comma_backtrack
        self.chunks: list[TokenChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[ChunkFix] = []
        self.last_comma = -1  # position of the last comma in the current chunk

    def add(self, token: int, weight: float) -> None:
        self._make_room(token)
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, token: int, embedding: TriggeredEmbedding, weight: float) -> None:
        """An embedding whose name starts with ``token``: n placeholder positions, all with ``weight``."""
        self._make_room(token)
        count = int(embedding.vector_count)
        if len(self.ids) + count > CHUNK_TOKENS:  # A1111: it does not fit, so it starts the next chunk
            self.close_chunk()
        self.fixes.append(ChunkFix(len(self.ids), embedding))
        self.ids.extend([PLACEHOLDER_ID] * count)
        self.weights.extend([weight] * count)

    def _make_room(self, token: int) -> None:
        """The checks A1111 runs before every prompt position: remember commas, backtrack, close a full chunk."""
        if token == self.special.comma:
            self.last_comma = len(self.ids)
        elif self._full() and self.last_comma != -1 and len(self.ids) - self.last_comma <= self.comma_backtrack:
            self._move_tail_after_comma()
        if self._full():
            self.close_chunk()

    def _full(self) -> bool:
        return len(self.ids) == CHUNK_TOKENS

    def _move_tail_after_comma(self) -> None:
        cut = self.last_comma + 1
        tail_ids, tail_weights = self.ids[cut:], self.weights[cut:]
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        # The fixes stay with the closed chunk, even those in the moved tail: A1111 moves only tokens and
        # multipliers (tokenize_line), and its images carry that; see the module docstring.
        self.close_chunk()
        self.ids, self.weights = tail_ids, tail_weights

    def close_chunk(self) -> None:
        """Pad the current chunk, wrap it in BOS/EOS and start an empty one."""
        missing = CHUNK_TOKENS - len(self.ids)
        ids = [self.special.bos, *self.ids, *[self.special.eos] * missing, self.special.eos]
        weights = [1.0, *self.weights, *[1.0] * missing, 1.0]
        first_eos = ids.index(self.special.eos)
        ids[first_eos + 1 :] = [self.special.pad] * (len(ids) - first_eos - 1)
        self.chunks.append(TokenChunk(tuple(ids), tuple(weights), tuple(self.fixes)))
        self.ids, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def finish(self) -> list[TokenChunk]:
        if self.ids or not self.chunks:
            self.close_chunk()
        return self.chunks


@lru_cache(maxsize=1)
def load_clip_tokenizer() -> Any:
    """The CLIP BPE tokenizer shipped in ``difusi/assets/tokenizers/clip`` (no network).

    The same vocabulary serves CLIP ViT-L (SD1), OpenCLIP ViT-H (SD2) and both SDXL encoders;
    only the pad id differs, and that is the encoder's business (``pad_token_id``).
    """
    from difusi.prompts.bpe import ClipTokenizer  # difusi's own: transformers' CLIPTokenizer ids, no transformers

    folder = resources.files("difusi") / "assets" / "tokenizers" / "clip"
    return ClipTokenizer(Path(str(folder / "vocab.json")), Path(str(folder / "merges.txt")), model_max_length=77)

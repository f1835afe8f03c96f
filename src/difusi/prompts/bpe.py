"""difusi's own CLIP BPE tokenizer: the ids transformers 5's `CLIPTokenizer` gives, without transformers.

CLIP's tokenizer is OpenAI's byte-level BPE (Radford et al. 2021; OpenAI `clip/simple_tokenizer.py`) with a
`</w>` end-of-word marker. transformers 5's `CLIPTokenizer` (`models/clip/tokenization_clip.py`) runs it on the
Hugging Face `tokenizers` pipeline, and that pipeline is what is reproduced here, step by step:

1. Added tokens: the literal strings `<|startoftext|>` / `<|endoftext|>` (case-sensitive, not normalized, no
   stripping) become their ids; the text between them is tokenized on its own.
2. Normalizer: Unicode NFC, every run of whitespace (`\\s+`, Unicode White_Space) -> one space, then lower-casing
   character by character (so no final-sigma rule: "ΟΔΟΣ" -> "οδοσ", unlike `str.lower`). There is no ftfy step
   and no HTML unescaping in transformers 5 (OpenAI's `basic_clean` did both).
3. Pre-tokenizer: CLIP's pattern ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
   [^\\s\\p{L}\\p{N}]+`` keeps its matches (letter runs, single digits, runs of other non-space characters); then
   the `ByteLevel` pre-tokenizer splits each piece again with GPT-2's pattern (which only changes pieces like a
   lower-cased "<|endoftext|>": "<|", "endoftext", "|>") and maps its UTF-8 bytes through GPT-2's byte-to-unicode
   table.
4. Model: BPE over each word with the merge ranks of `merges.txt`, the word's last symbol carrying `</w>`; a
   symbol missing from the vocabulary becomes the unknown token (`<|endoftext|>`; cannot happen with CLIP's
   vocabulary, which has every byte with and without `</w>`).

The patterns need `\\p{L}` / `\\p{N}`, so this module uses the `regex` package (a transformers dependency that
imports on its own in ~10 ms). Words' BPE results are cached.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex

__all__ = ["ClipTokenizer", "BatchEncoding", "bytes_to_unicode"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

_SPECIAL = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>")
_WHITESPACE = regex.compile(r"\s+")
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (OpenAI `bytes_to_unicode`): the printable Latin-1
    bytes map to themselves, the other 68 to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class BatchEncoding(dict):
    """The tokenizer's result: a dict (`["input_ids"]`) whose keys are also attributes (`.input_ids`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ClipTokenizer:
    """CLIP's BPE tokenizer from a `vocab.json` and a `merges.txt`; the interface difusi uses of transformers'.

    `tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]` gives one id list
    per text; with `add_special_tokens=True` (the default) each is wrapped in BOS ... EOS. `padding="max_length"`,
    `max_length`, `truncation=True` and `return_tensors="pt"` work as in transformers for training code.
    `pad_token` defaults to `<|endoftext|>` (transformers' default); OpenCLIP's encoders pad with "!" (id 0).
    """

    def __init__(self, vocab_path: str | Path, merges_path: str | Path, *, model_max_length: int = 77,
                 pad_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN, bos_token: str = BOS_TOKEN,
                 eos_token: str = EOS_TOKEN, cache_size: int = 65536):
        with open(vocab_path, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        self.decoder = {i: token for token, i in self.encoder.items()}
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[0].startswith("#version"):  # only the header: "# #</w>" is a real merge further down
            lines = lines[1:]
        # Ranks keyed by the merge line itself ("a b"): symbols never hold a space (the byte table maps it to
        # "Ġ"), so the line names the pair exactly, and loading skips building 48,894 tuples.
        merges = [line for line in lines if line]
        bad = next((line for line in merges if line.count(" ") != 1), None)
        if bad is not None:
            raise ValueError(f"{merges_path}: a merge must be two symbols, got {bad!r}")
        self.ranks: dict[str, int] = {line: rank for rank, line in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self.encoder[bos_token]
        self.eos_token_id = self.encoder[eos_token]
        self.pad_token_id = self.encoder[pad_token]
        self.unk_token_id = self.encoder[unk_token]
        self._special = {BOS_TOKEN: self.bos_token_id, EOS_TOKEN: self.eos_token_id}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = int(cache_size)

    # ------------------------------------------------------------------ vocabulary

    def get_vocab(self) -> dict[str, int]:
        """token -> id (a copy)."""
        return dict(self.encoder)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.encoder.get(tokens, self.unk_token_id)
        return [self.encoder.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.decoder[ids]
        return [self.decoder[int(i)] for i in ids]

    # ------------------------------------------------------------------ encoding

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized, byte-mapped word: merge the lowest-ranked adjacent pair until none is left."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best, best_rank = None, None
            for i in range(len(symbols) - 1):
                rank = self.ranks.get(symbols[i] + " " + symbols[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = i, rank
            if best is None:
                break
            first, second = symbols[best], symbols[best + 1]
            merged: list[str] = []
            i = 0
            while i < len(symbols):  # every non-overlapping occurrence, left to right
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = tuple(self.encoder.get(s, self.unk_token_id) for s in symbols)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Normalize, pre-tokenize and BPE a text without added tokens."""
        text = unicodedata.normalize("NFC", text)
        text = _WHITESPACE.sub(" ", text)
        text = "".join(c.lower() for c in text)  # per character, as the `tokenizers` Lowercase normalizer
        ids: list[int] = []
        for piece in _CLIP_PATTERN.findall(text):
            for word in _GPT2_PATTERN.findall(piece):
                ids.extend(self._bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text (`add_special_tokens`: wrapped in BOS ... EOS)."""
        ids: list[int] = []
        start = 0
        for match in _SPECIAL.finditer(text):
            ids.extend(self._encode_plain(text[start : match.start()]))
            ids.append(self._special[match.group()])
            start = match.end()
        ids.extend(self._encode_plain(text[start:]))
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def tokenize(self, text: str) -> list[str]:
        """The token strings of one text (no BOS/EOS)."""
        return [self.decoder[i] for i in self.encode(text, add_special_tokens=False)]

    def __call__(self, text: str | Iterable[str], add_special_tokens: bool = True, truncation: bool | str = False,
                 padding: bool | str = False, max_length: int | None = None, return_tensors: str | None = None,
                 verbose: bool = True, **_: Any) -> BatchEncoding:
        """transformers' call: `{"input_ids": [...], "attention_mask": [...]}` for a text or a list of texts.

        `truncation=True` cuts to `max_length` (default `model_max_length`) keeping BOS/EOS; `padding=
        "max_length"` pads with `pad_token_id` to `max_length`, `padding=True` / "longest" to the longest text.
        `verbose` only silences transformers' too-long warning, which this tokenizer never prints.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        limit = self.model_max_length if max_length is None else int(max_length)
        rows = []
        for item in texts:
            ids = self.encode(item, add_special_tokens=False)
            if truncation and truncation != "do_not_truncate":
                ids = ids[: max(0, limit - (2 if add_special_tokens else 0))]
            rows.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids)
        masks = [[1] * len(ids) for ids in rows]
        if padding and padding != "do_not_pad":
            width = limit if padding == "max_length" else max((len(ids) for ids in rows), default=0)
            for ids, mask in zip(rows, masks, strict=True):
                missing = max(0, width - len(ids))
                ids.extend([self.pad_token_id] * missing)
                mask.extend([0] * missing)
        if return_tensors == "pt":
            import torch

            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (only 'pt' or None)")
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids: bytes back from the table, `</w>` as a space, stripped (transformers' CLIP decode)."""
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id} if skip_special_tokens else set()
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in specials)
        data = bytearray()
        out: list[str] = []
        for char in text.replace(END_OF_WORD, " "):
            if char in self.byte_decoder:
                data.append(self.byte_decoder[char])
            else:
                out.append(data.decode("utf-8", errors="replace"))
                data = bytearray()
                out.append(char)
        out.append(data.decode("utf-8", errors="replace"))
        return "".join(out).strip()

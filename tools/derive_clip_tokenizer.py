"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped in
src/difusi/assets/tokenizers/clip from the merge list inside the open_clip_torch wheel.

Run once by a developer (the wheel comes from PyPI with `pip download --no-deps open_clip_torch`);
the derived files are committed so nothing is fetched at run time.
The vocabulary order follows the CLIP paper's released tokenizer (Radford et al. 2021):
256 byte symbols, the same with `</w>`, one entry per merge, then the two special tokens.
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode mapping, in its canonical order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(wheel: str, out_dir: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    lines = raw.split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

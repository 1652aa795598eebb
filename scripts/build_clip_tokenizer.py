"""Rebuild the CLIP BPE tokenizer files (vocab.json, merges.txt) offline, from open_clip's `bpe_simple_vocab_16e6.txt.gz`.

The SD2 checkpoint's `tokenizer/` folder holds the same vocabulary OpenCLIP ships. Its construction (CLIP, Radford et al.
2021): the 256 byte-level characters, the same with the end-of-word mark `</w>`, one token per merge (the first 48,894
merge lines of the file), then `<|startoftext|>` and `<|endoftext|>` -- 49,408 tokens in all.

    python scripts/build_clip_tokenizer.py OUT_DIR [--bpe PATH]

Without --bpe the file is taken from the installed `open_clip_torch` package (a test-only dependency).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # vocabulary size 49,408 = 2 x 256 byte tokens + merges + 2 specials


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items(), key=lambda kv: (kv[0] not in printable, printable.index(kv[0])
                                                       if kv[0] in printable else kv[0])))


def default_bpe_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("open_clip_torch is not installed; pass --bpe PATH to bpe_simple_vocab_16e6.txt.gz")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def build_vocab_and_merges(bpe_path: str | Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_folder(out_dir: str | Path, special_tokens_map: str | Path | None = None,
                           tokenizer_config: str | Path | None = None, bpe_path: str | Path | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(bpe_path or default_bpe_path())
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if special_tokens_map:
        shutil.copy(special_tokens_map, out / "special_tokens_map.json")
    if tokenizer_config:
        shutil.copy(tokenizer_config, out / "tokenizer_config.json")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--bpe", default=None, help="path to bpe_simple_vocab_16e6.txt.gz")
    args = ap.parse_args()
    print(write_tokenizer_folder(args.out_dir, bpe_path=args.bpe))

"""The CLIP tokenizer of Stable Diffusion 2: byte-level BPE on the `tokenizers` library.

Text becomes a fixed-length row of token ids in five steps (Radford et al. 2021, "CLIP", section 2.4; the BPE itself is
Sennrich et al. 2016 on UTF-8 bytes as in GPT-2):

    1. normalise      NFC, every whitespace run -> one space, lower-case
    2. split          the CLIP regex: `<|startoftext|>`, `<|endoftext|>`, the contractions 's 't 're 've 'm 'll 'd,
                      runs of letters, single digits, runs of other non-space characters; spaces are dropped
    3. byte-level     each piece as UTF-8 bytes, one printable character per byte (GPT-2's table)
    4. BPE            merges from merges.txt; the last symbol of every piece carries the end-of-word mark `</w>`
    5. wrap and pad   <|startoftext|> (49406) + at most 75 ids + <|endoftext|> (49407), then padding to 77

This is exactly how transformers 5's (tokenizers-backed) `CLIPTokenizer` is set up, and it gives the same ids. Like that
tokenizer it does NOT run OpenCLIP's `ftfy.fix_text` / `html.unescape` cleaning: "&amp;" stays five characters.

The padding quirk. SD2's `special_tokens_map.json` says `pad_token: "!"`, and that file wins over tokenizer_config.json.
So padding uses id 0 (the vocabulary's "!"), and because the pad token is registered as a *special* token, every "!" typed
in a prompt is matched before BPE and also becomes id 0: "hello!!" -> `hello</w>`, 0, 0 instead of `hello</w>`, `!!</w>`
(748). diffusers behaves like this, so it is the default here. `pad_token_is_special=False` gives the original OpenCLIP
behaviour instead: "!" is an ordinary token ("!" -> 256, "!!" -> 748) and padding is still id 0 (OpenCLIP pads with
`torch.zeros`, i.e. with the id of "!" too). The text encoder never sees a difference in the padding, only in typed "!".

Usage mirrors transformers, so habits carry over:

    tok = CLIPTokenizer.from_pretrained("stable-diffusion-2-depth/tokenizer")
    tok(["a red car", "a cat!"], padding="max_length", max_length=tok.model_max_length, truncation=True,
        return_tensors="pt").input_ids        # LongTensor (2, 77)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# Step 2 above. Special tokens first so that a typed "<|endoftext|>" stays one piece.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
DEFAULT_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}
PADDING_CHOICES = (True, False, "longest", "max_length", "do_not_pad")


@dataclass
class TokenizerOutput:
    """`input_ids` and `attention_mask` (1 = real token, 0 = padding): lists, or (B, L) tensors/arrays."""
    input_ids: Any
    attention_mask: Any

    def __getitem__(self, key: str):  # tok(...)["input_ids"] works as with transformers
        if key not in ("input_ids", "attention_mask"):
            raise KeyError(f"{key!r}: a TokenizerOutput holds 'input_ids' and 'attention_mask'")
        return getattr(self, key)

    def keys(self):
        return ("input_ids", "attention_mask")


def _added_token(spec: str | dict) -> AddedToken:
    """A special token from a tokenizer JSON file: a plain string, or a dict with `content` and matching flags.

    Like transformers: a plain string is matched on the raw text (normalized=False); a dict keeps its own flags (SD2's
    bos/eos say normalized=True, so "<|STARTOFTEXT|>" also matches, after lower-casing)."""
    if isinstance(spec, str):
        return AddedToken(spec, special=True, normalized=False)
    flags = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in spec}
    return AddedToken(spec["content"], special=True, **flags)


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer with the SD2 checkpoint's special tokens (see the module docstring)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, bos_token: str | dict = "<|startoftext|>",
                 eos_token: str | dict = "<|endoftext|>", unk_token: str | dict = "<|endoftext|>",
                 pad_token: str | dict = "<|endoftext|>", model_max_length: int = 77, pad_token_is_special: bool = True):
        if not isinstance(pad_token_is_special, bool):
            raise TypeError(f"pad_token_is_special must be a bool, got {pad_token_is_special!r}")
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 (room for BOS and EOS), got {model_max_length!r}")
        specials = {"bos": _added_token(bos_token), "eos": _added_token(eos_token), "unk": _added_token(unk_token),
                    "pad": _added_token(pad_token)}
        for role, token in specials.items():
            if token.content not in vocab:
                raise ValueError(f"{role}_token {token.content!r} is not in the vocabulary")
        self.model_max_length = model_max_length
        self.pad_token_is_special = pad_token_is_special
        self._vocab, self._merges = vocab, merges  # kept for save_pretrained
        self.bos_token, self.eos_token = specials["bos"].content, specials["eos"].content
        self.unk_token, self.pad_token = specials["unk"].content, specials["pad"].content
        self.bos_token_id, self.eos_token_id = vocab[self.bos_token], vocab[self.eos_token]
        self.unk_token_id, self.pad_token_id = vocab[self.unk_token], vocab[self.pad_token]

        self._specials = specials
        self._added: dict[str, int] = {}  # textual-inversion tokens (`add_tokens`): text -> id
        self.backend = self._build_backend()  # `tokenizers.Tokenizer`; `backend.encode(text).ids` = ids with BOS/EOS

    def _build_backend(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` for steps 1-5 of the module docstring (without added tokens)."""
        vocab, merges, specials = self._vocab, self._merges, self._specials
        tok = Tokenizer(BPE(vocab, merges, unk_token=self.unk_token, end_of_word_suffix=END_OF_WORD,
                            continuing_subword_prefix="", fuse_unk=False, dropout=None))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        # "invert": the regex matches the pieces we keep; everything between them (spaces) is removed.
        # ByteLevel keeps its default use_regex=True (GPT-2's split), as transformers does; after the CLIP split
        # there is nothing left for it to cut, it only maps bytes to characters.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing((self.eos_token, self.eos_token_id),
                                                          (self.bos_token, self.bos_token_id),
                                                          trim_offsets=False, add_prefix_space=False)
        # Special tokens are matched in the raw (or normalised) text before splitting; this is where "!" becomes id 0.
        added = [specials["pad"]] if self.pad_token_is_special else []
        added += [specials["bos"], specials["eos"], specials["unk"]]
        tok.add_special_tokens(added)
        return tok

    # ---------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, pad_token_is_special: bool = True) -> CLIPTokenizer:
        """Load a hub `tokenizer/` folder: vocab.json, merges.txt and (optional) tokenizer_config.json and
        special_tokens_map.json. As in transformers, special_tokens_map.json wins over tokenizer_config.json."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"tokenizer folder {folder} has no {name}")
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        config, tokens = {}, dict(DEFAULT_TOKENS)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # later file wins
            if (folder / name).is_file():
                data = json.loads((folder / name).read_text(encoding="utf-8"))
                config.update(data)
                tokens.update({k: data[k] for k in DEFAULT_TOKENS if data.get(k) is not None})
        max_len = config.get("model_max_length", 77)
        if not isinstance(max_len, int) or max_len > 10_000:  # transformers writes 1e30 for "no limit"
            raise ValueError(f"{folder}: model_max_length {max_len!r} is not a usable CLIP context length")
        tokenizer = cls(vocab, merges, **tokens, model_max_length=max_len, pad_token_is_special=pad_token_is_special)
        added = {int(i): spec["content"] for i, spec in (config.get("added_tokens_decoder") or {}).items()
                 if not spec.get("special", False) and spec["content"] not in vocab}
        if added:  # words added by textual inversion (saved by save_pretrained here or by transformers)
            ids = tokenizer.add_tokens([added[i] for i in sorted(added)])
            if ids != sorted(added):
                raise ValueError(f"{folder}: added tokens have ids {sorted(added)}, expected {ids}")
        return tokenizer

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the hub's `tokenizer/` files (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json),
        readable by `from_pretrained` and by transformers' CLIPTokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join(" ".join(pair) for pair in self._merges)
        (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                  "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
        config = {**tokens, "tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                  "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
        if self._added:  # textual-inversion words, as transformers writes them
            config["added_tokens_decoder"] = {str(i): {"content": t, "lstrip": False, "normalized": True,
                                                       "rstrip": False, "single_word": False, "special": False}
                                              for t, i in self.added_tokens_encoder.items()}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------------------------------------------- added tokens
    # Textual inversion (minidepth.adapters) adds words: each is matched in the lower-cased text before BPE (like
    # transformers' `add_tokens`: an AddedToken with normalized=True, special=False) and gets the next free id.
    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add new words; returns their ids (49408, 49409, ... for SD2). A word already known is an error."""
        known = [t for t in tokens if t in self.get_vocab()]
        if known or len(set(tokens)) != len(tokens):
            raise ValueError(f"add_tokens: {known or tokens} already in the vocabulary (or repeated)")
        self.backend.add_tokens([AddedToken(t, special=False, normalized=True) for t in tokens])
        ids = [self.backend.token_to_id(t) for t in tokens]
        self._added.update(zip(tokens, ids))
        return ids

    def remove_added_tokens(self) -> None:
        """Forget every word added by `add_tokens` (the tokenizer is then exactly as loaded)."""
        self._added = {}
        self.backend = self._build_backend()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """The words added by `add_tokens`: text -> id, in id order."""
        return dict(sorted(self._added.items(), key=lambda item: item[1]))

    def get_vocab(self) -> dict[str, int]:
        """Every known token -> id: the BPE vocabulary and the added words."""
        return {**self._vocab, **self._added}

    # ---------------------------------------------------------------------------------------------------- encoding
    def __call__(self, text: str | list[str] | tuple[str, ...], *, padding: bool | str = False,
                 max_length: int | None = None, truncation: bool | None = None,
                 return_tensors: str | None = None) -> TokenizerOutput:
        """Token ids for one text or a batch, with transformers' argument semantics:

        padding         False / "do_not_pad": none; True / "longest": to the longest row of the batch;
                        "max_length": to `max_length` (rows that are longer stay longer unless truncated)
        max_length      defaults to `model_max_length` (77) when padding="max_length" or truncation is on
        truncation      True: keep BOS, the first max_length-2 tokens and EOS. None (default) means "on if max_length
                        is given and padding is False", transformers' legacy rule; False: never
        return_tensors  None: lists (a str gives one list, not a batch); "pt": torch.long (B, L); "np": int64 array

        diffusers calls `tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")`.
        """
        texts = self._check_text(text)
        if padding not in PADDING_CHOICES or not isinstance(padding, (bool, str)):
            raise ValueError(f"padding must be one of {PADDING_CHOICES}, got {padding!r}")
        if truncation not in (None, True, False) or not isinstance(truncation, (bool, type(None))):
            raise TypeError(f"truncation must be True, False or None, got {truncation!r}")
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 2):
            raise ValueError(f"max_length must be None or an int >= 2 (room for BOS and EOS), got {max_length!r}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")

        pad_mode = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        if truncation is None:
            truncation = max_length is not None and pad_mode is None
        if max_length is None and (truncation or pad_mode == "max_length"):
            max_length = self.model_max_length

        rows = [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=True)]
        if truncation:
            rows = [self._truncate(ids, max_length) for ids in rows]
        length = max(len(ids) for ids in rows) if pad_mode == "longest" else max_length
        masks = [[1] * len(ids) for ids in rows]
        if pad_mode is not None:
            masks = [m + [0] * (length - len(m)) for m in masks]
            rows = [ids + [self.pad_token_id] * (length - len(ids)) for ids in rows]
        return self._package(rows, masks, return_tensors, batched=not isinstance(text, str))

    @staticmethod
    def _check_text(text) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)):
            if len(text) == 0:
                raise ValueError("text is an empty list; pass a string or a non-empty list of strings")
            bad = [(i, type(t).__name__) for i, t in enumerate(text) if not isinstance(t, str)]
            if bad:
                raise TypeError(f"text must be a str or a list of str; items {bad[:5]} are not strings")
            return list(text)
        raise TypeError(f"text must be a str or a list/tuple of str, got {type(text).__name__}")

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        """Cut the text tokens, not the wrapping: the row keeps its BOS and EOS (what `tokenizers` does)."""
        if len(ids) <= max_length:
            return ids
        bos, *content, eos = ids  # added by the post-processor
        return [bos, *content[:max_length - 2], eos]

    @staticmethod
    def _package(rows, masks, return_tensors, batched: bool) -> TokenizerOutput:
        if return_tensors is None:
            return TokenizerOutput(rows, masks) if batched else TokenizerOutput(rows[0], masks[0])
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"rows have different lengths {sorted({len(r) for r in rows})}; cannot make a "
                             f"{return_tensors!r} tensor. Use padding='longest' or padding='max_length'")
        if return_tensors == "pt":
            return TokenizerOutput(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long))
        import numpy as np
        return TokenizerOutput(np.array(rows, dtype=np.int64), np.array(masks, dtype=np.int64))

    # ---------------------------------------------------------------------------------------------------- decoding
    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of one row of ids (list, 1-D tensor/array or a single int). Word ends (`</w>`) become spaces.
        With `skip_special_tokens` BOS, EOS and (when it is special, the default) the "!" pad token are dropped."""
        ids = self._as_id_list(ids, "ids")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def batch_decode(self, batch, *, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        if not isinstance(batch, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in batch):
            raise TypeError("batch_decode expects a list of id lists or a 2-D tensor/array, "
                            f"got {type(batch).__name__}")
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    @staticmethod
    def _as_id_list(ids, name: str) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            return [ids]
        if isinstance(ids, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return list(ids)
        raise TypeError(f"{name} must be an int, a list of ints or a 1-D tensor/array, got {ids!r:.80}")

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"pad_token={self.pad_token!r} (id {self.pad_token_id}), pad_token_is_special={self.pad_token_is_special})")

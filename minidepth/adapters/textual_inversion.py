"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new words whose token embeddings were learned.

An embedding file holds one or more vectors of the text encoder's width (1024 for SD2). Loading it

    1. adds a token to the tokenizer for each vector: `<tok>`, and for a multi-vector embedding `<tok>_1`, `<tok>_2`, ...
       (ids after the vocabulary: 49408, 49409, ...);
    2. gives the text encoder a bigger `token_embedding` (a new nn.Embedding: the old rows, then the new vectors);
    3. from then on a prompt "a photo of <tok>" is rewritten "a photo of <tok> <tok>_1 <tok>_2" before tokenizing, so
       the text encoder sees every vector (diffusers' `maybe_convert_prompt`).

Files (diffusers' `load_textual_inversion` reads the same): A1111 / webui `.pt` ({"string_to_param": {"*": vectors},
"name": ...}), a single-key `.safetensors` / `.bin` (diffusers' {"<tok>": vector}, kohya's {"emb_params": vectors}; the
key is the token unless `token=` is given), or a bare tensor with `token=`. Pickles are opened only with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.hub import hub_file, is_repo_id
from ..checkpoints.loader import CheckpointError

WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


class EmbeddingError(CheckpointError):
    """An embedding that cannot be added: wrong width, a token that exists already, an unknown file layout."""


# ------------------------------------------------------------------------------------------------ reading files
def read_embedding_file(source, weight_name: str | None = None, **hub) -> tuple[object, str]:
    """A path (file or folder) or a Hub repo id (`owner/name`, e.g. an sd-concepts-library repo; `weight_name` and the
    `hub` options of checkpoints.hub.hub_file) -> (its contents: a tensor or a dict, description). Dicts and tensors
    pass through."""
    if isinstance(source, (Mapping, torch.Tensor)):
        return source, "the given embedding"
    if is_repo_id(source):
        source = hub_file(str(source), (weight_name,) if weight_name else WEIGHT_NAMES, what="embedding", **hub)
    path = Path(os.fspath(source))
    if path.is_dir():
        names = [weight_name] if weight_name else list(WEIGHT_NAMES)
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no embedding file in {path} (looked for {', '.join(names)})")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"embedding file or folder not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path)), str(path)
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except Exception as e:
        raise EmbeddingError(f"{path}: cannot read the embedding ({type(e).__name__}: {str(e).splitlines()[0]}). "
                             "Pickles are only opened with torch.load(weights_only=True).") from e


def token_and_vectors(contents, token: str | None, where: str) -> tuple[str, torch.Tensor]:
    """The file's token (or `token`, which overrides it) and its vectors as an (n, D) tensor."""
    if isinstance(contents, torch.Tensor):
        if token is None:
            raise EmbeddingError(f"{where} is a bare tensor: pass the token to use, token='<...>'")
        file_token, vectors = token, contents
    elif isinstance(contents, Mapping) and "string_to_param" in contents:  # A1111 / webui
        file_token, vectors = contents.get("name"), contents["string_to_param"]["*"]
    elif isinstance(contents, Mapping) and len(contents) == 1:  # diffusers {"<tok>": vec}, kohya {"emb_params": vecs}
        file_token, vectors = next(iter(contents.items()))
    else:
        keys = list(contents)[:6] if isinstance(contents, Mapping) else type(contents).__name__
        raise EmbeddingError(f"{where}: not a textual-inversion embedding (expected a single-key dict or an A1111 "
                             f"file with 'string_to_param'; found {keys})")
    token = token or file_token
    if not isinstance(token, str) or not token:
        raise EmbeddingError(f"{where} names no token; pass token='<...>'")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise EmbeddingError(f"{where}: the embedding of {token!r} must be a float tensor (D,) or (n, D), got "
                             f"{getattr(vectors, 'shape', type(vectors).__name__)}")
    return token, vectors.reshape(-1, vectors.shape[-1])


def expand(token: str, vectors: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One token per vector: <tok>, <tok>_1, <tok>_2, ... (diffusers' multi-vector naming)."""
    return [(token if i == 0 else f"{token}_{i}", v) for i, v in enumerate(vectors)]


def check_new_tokens(pairs: list[tuple[str, torch.Tensor]], tokenizer, width: int, where: str) -> None:
    """Every vector must have the text encoder's width, and no token may exist already (vocabulary or added)."""
    for tok, vector in pairs:
        if vector.shape[-1] != width:
            hint = " (a Stable Diffusion 1.x embedding? SD2's text encoder is 1024 wide)" if vector.shape[-1] == 768 else ""
            raise EmbeddingError(f"{where}: the embedding of {tok!r} is {vector.shape[-1]} wide but this text encoder "
                                 f"takes {width}{hint}")
    tokens = [tok for tok, _ in pairs]
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise EmbeddingError(f"{where}: token(s) {duplicates} given more than once")
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise EmbeddingError(f"{where}: token(s) {taken} already in the tokenizer's vocabulary; choose another "
                             "token=... or unload_textual_inversion() first")


# ------------------------------------------------------------------------------------------------ the text encoder
def set_token_rows(text_encoder: nn.Module, ids: list[int], vectors: list[torch.Tensor]) -> None:
    """Replace the text encoder's token_embedding by a bigger one: the old rows, then `vectors` at rows `ids`."""
    old = text_encoder.token_embedding
    rows = max(old.num_embeddings, max(ids) + 1)
    new = nn.Embedding(rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:old.num_embeddings] = old.weight
        new.weight[ids] = torch.stack(vectors).to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.requires_grad_(old.weight.requires_grad)
    text_encoder.token_embedding = new
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=rows)


def convert_prompt(prompt: str, tokenizer) -> str:
    """Spell out multi-vector tokens: "<tok>" -> "<tok> <tok>_1 <tok>_2" when <tok>_1 exists (diffusers'
    `_maybe_convert_prompt`: the token's text is replaced wherever it occurs)."""
    added = tokenizer.added_tokens_encoder
    ids = set(tokenizer.backend.encode(prompt, add_special_tokens=False).ids)
    for token, token_id in added.items():
        if token_id in ids and f"{token}_1" in added:
            i, replacement = 1, token
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt

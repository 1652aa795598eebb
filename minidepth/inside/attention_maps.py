"""Where does each word of the prompt look? Cross-attention maps per word, in the spirit of DAAM (Tang et al. 2022,
"What the DAAM: Interpreting Stable Diffusion Using Cross Attention").

    with record_attention(pipe, words=["cat", "statue"]) as rec:     # words: optional, checked before any work
        image = pipe("a marble statue of a cat", image=photo).images[0]
    maps = rec.word_maps(["cat", "statue"])                          # {"cat": (H, W) tensor in [0, 1], ...}
    rec.save("maps/", image)                                         # maps/attn-cat.png, maps/attn-statue.png

Every cross-attention layer (`attn2` of each UNet transformer block) computes, for each image position p and text
token s, the weight A[p, s] = softmax_s(q_p . k_s / sqrt(d)): how much of token s flows into position p. The map of a
token is A[:, s] laid out on the layer's (h, w) grid. Aggregation (all choices in one place, `_record`):

  1. cross-attention only, and only the CONDITIONAL half of the guidance batch (the UNet runs [unconditional;
     conditional] in one batch; the unconditional half attends to the empty prompt);
  2. all heads: the mean over heads;
  3. every layer whose map is at least 1/32 of the image side (h * 32 >= H and w * 32 >= W; at 512x512 that is the
     64, 32 and 16 grids, all but the 8x8 mid block);
  4. all steps (every UNet call of the generation);
  5. each (layer, call) map is upsampled to the image size with bicubic interpolation (align_corners=False) and
     clamped at 0 (bicubic overshoots below 0 next to sharp peaks), then added to a running sum per token;
  6. raw map of a token = that sum / the number of (layer, call) maps (`token_maps()`);
  7. a word's map is the mean of the raw maps of its sub-word tokens (CLIP's BPE may split a word into several;
     a word that occurs twice contributes both occurrences);
  8. normalised per word to [0, 1]: (m - min) / (max - min) (all zeros for a constant map); `normalize=False` gives
     the raw mean.

Memory stays bounded: the running sums are (batch, tokens, H, W) float32 for the prompt's own tokens (BOS, the words,
EOS: usually 10-20 of the 77), whatever the number of steps; no per-step map is kept.

The recorder does not change the image: its attention processor returns the layer's own product `attn.attend(q, k,
v)` (the configured backend: SDPA, sliced, ...), exactly what the layer computes without it; the probabilities are
computed separately, for the record only. What it needs of the generation it learns as an observer of the pipeline
(minidepth/observers.py): the prompts from `generation_started` (so that a word not in the prompt is an error before the
text encoder runs) or, when a notebook calls the steps one by one, from `prompt_encoded`; the latent size and whether
the batch is guided from `denoising_started`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..models.attention import Attention, name_attention_layers
from ..observers import Observer
from . import safe_name

MIN_SIDE_FRACTION = 1 / 32


def word_token_positions(tokenizer, prompt: str, word: str, max_length: int = 77) -> list[int]:
    """Positions of `word`'s sub-word tokens in the tokenized `prompt` (BOS at 0), every occurrence; [] if absent.
    A word is matched as a whole token sequence ("cat" does not match "cats", which is one token `cats</w>`)."""
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
    pieces = tokenizer(word).input_ids[1:-1]  # without BOS and EOS
    end = ids.index(tokenizer.eos_token_id, 1) if tokenizer.eos_token_id in ids[1:] else len(ids)
    if not pieces:
        return []
    return [i + j for i in range(1, end - len(pieces) + 1) if ids[i:i + len(pieces)] == pieces
            for j in range(len(pieces))]


def check_words(tokenizer, prompt: str | None, words: list[str], max_length: int = 77) -> None:
    """ValueError naming every word that is not in the prompt (after tokenization and truncation to 77 tokens)."""
    if not words:
        return
    if prompt is None:
        raise ValueError("attention maps per word need the prompt text (not only prompt_embeds)")
    missing = [w for w in words if not word_token_positions(tokenizer, prompt, w, max_length)]
    if missing:
        raise ValueError(f"attention maps: {', '.join(repr(w) for w in missing)} not in the prompt {prompt!r} "
                         f"(words are matched whole, after CLIP's lower-casing and truncation to {max_length} "
                         "tokens); choose words of the prompt")


def grid_sizes(height: int, width: int, levels: int = 8) -> list[tuple[int, int]]:
    """The UNet's grids from the latent size down: (h, w), (ceil(h/2), ceil(w/2)), ..."""
    sizes = [(height, width)]
    for _ in range(levels):
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


class AttentionRecorder(Observer):
    """Context manager and pipeline observer that records the UNet's cross-attention per token (module docstring: the
    rules). `words`: checked against the prompt when the pipeline starts, before the text encoder runs. Entering it
    puts its processor on every cross-attention layer and adds it to `pipe.observing(...)`; leaving undoes both."""

    def __init__(self, pipe, words: list[str] | None = None, min_side_fraction: float = MIN_SIDE_FRACTION):
        self.pipe, self.words, self.min_side_fraction = pipe, list(words or []), min_side_fraction
        self.sums: torch.Tensor | None = None      # (B, tokens, H, W) float32 running sums
        self.count = 0                             # (layer, call) maps added
        self.layers_used: set[str] = set()
        self.prompts: list[str | None] = []        # the prompt of each conditional batch row
        self._stack: contextlib.ExitStack | None = None
        self._guided, self._image_size, self._grids, self._tokens = True, None, [], 77

    # -- attaching
    def __enter__(self) -> AttentionRecorder:
        stack = contextlib.ExitStack()
        layers = [a for a in name_attention_layers(self.pipe.unet) if a.is_cross_attention]
        previous = {layer: layer.processor for layer in layers}

        def restore():
            for layer, processor in previous.items():
                layer.processor = processor
        stack.callback(restore)
        for layer in layers:
            layer.processor = self._processor(previous[layer])
        stack.enter_context(self.pipe.observing(self))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # -- observing (the pipeline's events, minidepth/observers.py)
    def generation_started(self, pipe, *, prompt, num_images_per_prompt: int, **data) -> None:
        """Before any model runs: a word that is not in the prompt is an error now, and the sums start afresh."""
        self._start(prompt, num_images_per_prompt)

    def prompt_encoded(self, pipe, *, prompt, num_images_per_prompt: int, **data) -> None:
        """The same once more (nothing is recorded in between): for a notebook that calls `encode_prompt` itself,
        without `generation_started`, this is where the recorder learns the prompt."""
        self._start(prompt, num_images_per_prompt)

    def _start(self, prompt, n: int) -> None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else [None]
        for p in prompts:
            check_words(self.pipe.tokenizer, p, self.words)
        self.prompts = [p for p in prompts for _ in range(n)]  # [p0, p0, p1, p1], as the embeddings
        tok = self.pipe.tokenizer
        lengths = [len(tok(p, truncation=True, max_length=tok.model_max_length).input_ids) for p in prompts
                   if p is not None]
        self._tokens = max(lengths) if lengths and None not in prompts else tok.model_max_length
        self.sums, self.count, self.layers_used = None, 0, set()

    def denoising_started(self, pipe, *, latents: torch.Tensor, guidance_scale: float, **data) -> None:
        self._guided = guidance_scale > 1
        h, w = latents.shape[-2:]
        self._image_size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
        self._grids = grid_sizes(h, w)

    def _processor(self, previous):
        def processor(attn: Attention, q, k, v, **kwargs):
            out = previous(attn, q, k, v, **kwargs) if previous is not None else \
                attn.attend(q, k, v, kwargs.get("key_mask"))  # the layer's own product: the image is unchanged
            if self._image_size is not None:
                self._record(attn, q, k, kwargs.get("key_mask"))
            return out
        return processor

    # -- recording (the rules of the module docstring, in order)
    @torch.no_grad()
    def _record(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, key_mask) -> None:
        H, W = self._image_size
        grid = next((g for g in self._grids if g[0] * g[1] == q.shape[2]), None)
        if grid is None:
            raise RuntimeError(f"attention maps: layer {attn.name} has {q.shape[2]} positions, which is none of the "
                               f"UNet's grids {self._grids[:5]}")
        h, w = grid
        if h < H * self.min_side_fraction or w < W * self.min_side_fraction:        # 3. too coarse a layer
            return
        if self._guided:                                                            # 1. conditional half
            half = q.shape[0] // 2
            q, k = q[half:], k[half:]
            key_mask = key_mask[half:] if key_mask is not None else None
        probs = attn.probs(q, k, key_mask)[..., :self._tokens].float()             # (B, heads, h*w, tokens)
        maps = probs.mean(dim=1).transpose(1, 2).reshape(q.shape[0], -1, h, w)      # 2. mean over heads
        maps = F.interpolate(maps, size=(H, W), mode="bicubic", align_corners=False).clamp_(min=0)  # 5.
        self.sums = maps if self.sums is None else self.sums.add_(maps)             # 4. all calls, summed
        self.count += 1
        self.layers_used.add(attn.name)

    # -- results
    def token_maps(self, index: int = 0) -> torch.Tensor:
        """Raw map of every recorded token of batch row `index`: (tokens, H, W), position 0 = BOS (rule 6)."""
        if self.sums is None or self.count == 0:
            raise RuntimeError("no attention was recorded: run the pipeline inside `with record_attention(pipe)`")
        if not -self.sums.shape[0] <= index < self.sums.shape[0]:
            raise IndexError(f"index {index} out of range for {self.sums.shape[0]} images")
        return (self.sums[index] / self.count).cpu()

    def word_maps(self, words: list[str] | str, index: int = 0, normalize: bool = True) -> dict[str, torch.Tensor]:
        """{word: (H, W) map} for batch row `index`: mean over the word's tokens (rule 7), in [0, 1] (rule 8)."""
        words = [words] if isinstance(words, str) else list(words)
        prompt = self.prompts[index] if self.prompts else None
        check_words(self.pipe.tokenizer, prompt, words)
        raw = self.token_maps(index)
        out = {}
        for word in words:
            positions = word_token_positions(self.pipe.tokenizer, prompt, word)
            m = raw[positions].mean(dim=0)
            out[word] = normalize_map(m) if normalize else m
        return out

    def overlays(self, image: PIL.Image.Image, words: list[str] | None = None, index: int = 0,
                 alpha: float = 0.55) -> dict[str, PIL.Image.Image]:
        """{word: the image with the word's map as a heat map on top} (`alpha`: the heat map's weight)."""
        maps = self.word_maps(words or self.words, index)
        return {word: heat_overlay(image, m, alpha) for word, m in maps.items()}

    def save(self, folder: str | Path, image: PIL.Image.Image, words: list[str] | None = None, index: int = 0,
             prefix: str = "attn-") -> list[Path]:
        """Write `<folder>/<prefix><word>.png` heat-map overlays; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for word, overlay in self.overlays(image, words, index).items():
            path = folder / f"{prefix}{safe_name(word)}.png"
            overlay.save(path)
            paths.append(path)
        return paths


# ------------------------------------------------------------------------------------------------ pictures
def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """(m - min) / (max - min); a constant map gives zeros."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def heat_overlay(image: PIL.Image.Image, heat: torch.Tensor, alpha: float = 0.55) -> PIL.Image.Image:
    """A [0, 1] map (H, W) coloured with the depth ramp (dark purple 0 -> bright yellow 1), blended over `image`."""
    from ..depth import colorize_depth
    heat = normalize_map(heat.float())
    colour = PIL.Image.fromarray(colorize_depth(heat), "RGB")
    base = image.convert("RGB")
    if base.size != colour.size:
        base = base.resize(colour.size, PIL.Image.BICUBIC)
    grey = PIL.Image.merge("RGB", [base.convert("L")] * 3)  # the photo in grey, so the colours read as heat
    return PIL.Image.fromarray((np.asarray(grey, np.float32) * (1 - alpha) +
                                np.asarray(colour, np.float32) * alpha).round().astype(np.uint8))


def record_attention(pipe, words: list[str] | None = None, **kwargs) -> AttentionRecorder:
    """`with record_attention(pipe, ["cat"]) as rec: pipe(...)`, then `rec.word_maps(["cat"])`: cross-attention maps
    per word; the image is unchanged."""
    return AttentionRecorder(pipe, words, **kwargs)

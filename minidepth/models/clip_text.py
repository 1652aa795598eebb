"""The CLIP text transformer of Stable Diffusion 2 (OpenCLIP ViT-H-14's text tower, minus its last block).

    x_0 = token_embedding[ids] + position_embedding[0..L)                                   the embeddings output
    x_i = x_{i-1} + Attn(LN1(x_{i-1}))   then   x_i = x_i + MLP(LN2(x_i))        layer i = 1..n (pre-LN, GPT-2 style)
    last_hidden_state = final_layer_norm(x_n)

Attention is causal (token t sees tokens 0..t; Radford et al. 2021, "CLIP", section 2.4, which follows GPT-2), with h
heads (Vaswani et al. 2017, eq. 1); MLP = fc2(gelu(fc1(x))) with the exact (erf) GELU for SD2, or CLIP's original
"quick" GELU x * sigmoid(1.702 x) for OpenAI-CLIP-based models (SD1).

SD2 conditions the UNet on the output of OpenCLIP's *penultimate* block followed by `ln_final`. The diffusers checkpoint
simply stores 23 layers (of 24) so `last_hidden_state` is exactly that. `clip_skip=k` in the pipeline means:
`final_layer_norm(hidden_states[-(k + 1)])`; `final_layer_norm` is exposed for that.

Weights load from the diffusers/transformers `text_encoder/` folder (`TRANSFORMERS_KEYS`, `TRANSFORMERS_V5_KEYS`) or
from the `cond_stage_model.model.*` tensors of the original single-file checkpoint (`OPENCLIP_LDM_KEYS`).

Shapes: B batch, L tokens (<= 77), D width, h heads, d head size (D = h d).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..checkpoints import (KeyMap, Rule, TensorFile, build_on_meta, find_weights, load_weights,
                           read_json, save_component)


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77     # the context length; also the number of position embeddings
    width: int = 1024
    num_layers: int = 23
    num_heads: int = 16
    mlp_width: int = 4096
    hidden_act: str = "gelu"    # "gelu" (exact, erf) or "quick_gelu" (x * sigmoid(1.702 x))
    eps: float = 1e-5           # LayerNorm epsilon

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def sd2_depth(cls) -> CLIPTextConfig:
        """stable-diffusion-2-depth's text encoder: OpenCLIP ViT-H-14 text tower with 23 of its 24 blocks."""
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        """From transformers' `CLIPTextConfig` config.json. Traps:
        - `num_hidden_layers` (23 for SD2) already excludes the dropped OpenCLIP block; use it as is.
        - `projection_dim` belongs to `CLIPTextModelWithProjection`; this model has no projection, so it is unused.
        - `bos_token_id` 0, `eos_token_id` 2, `pad_token_id` 1 in SD2's file are stale defaults, not the tokenizer's
          ids (49406, 49407, 0); they only matter for pooled outputs, which SD does not use.
        - `dropout`, `attention_dropout`, `initializer_*` are training settings; ignored.
        """
        if "text_config" in d:
            raise ValueError("this is a full CLIPModel config; pass its 'text_config' dict")
        return cls(vocab_size=d["vocab_size"], max_positions=d["max_position_embeddings"], width=d["hidden_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                   mlp_width=d["intermediate_size"], hidden_act=d.get("hidden_act", "quick_gelu"),
                   eps=d.get("layer_norm_eps", 1e-5))

    def to_dict(self) -> dict:
        """transformers' config.json for this model (what `from_dict` reads)."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_positions, "hidden_size": self.width,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "intermediate_size": self.mlp_width, "hidden_act": self.hidden_act, "layer_norm_eps": self.eps,
                "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


# ------------------------------------------------------------------------------------------------ the model
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token t attends to tokens 0..t (and, with a padding mask, only to real ones)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B L D); key_mask (B L) bool, True = a token that may be attended to, or None."""
        q, k, v = (rearrange(proj(x), "B L (h d) -> B h L d", h=self.heads) for proj in (self.q, self.k, self.v))
        if key_mask is None:  # SD2's case: the causal mask alone, which SDPA builds itself
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            L = x.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()       # (L, L) query x key
            mask = causal[None, None] & key_mask[:, None, None, :]                    # (B, 1, L, L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(y, "B h L d -> B L (h d)"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B L D) -> (B L hidden) -> (B L D)


class CLIPLayer(nn.Module):
    """One pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.hidden_act)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor                       # (B, L, D), after final_layer_norm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layers + 1 of (B, L, D): embeddings, then each layer


class CLIPTextModel(nn.Module):
    """Token ids (B, L) -> token features (B, L, D). See the module docstring for the equations."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids: (B, L) integer tensor, L <= 77. attention_mask: optional (B, L), 1 = token, 0 = padding (SD2's
        pipeline passes none: padding tokens are only hidden by causality from the tokens before them)."""
        self._check_ids(input_ids)
        L = input_ids.shape[1]
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            if not key_mask[:, 0].all():  # the first query would see no key at all: NaN
                raise ValueError("attention_mask must be 1 at position 0 of every row (right padding, as the "
                                 "tokenizer makes it); left padding is not supported")

        positions = torch.arange(L, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)[None]  # (B, L, D)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, key_mask)
            hidden_states.append(x)
        return CLIPTextOutput(last_hidden_state=self.final_layer_norm(x),
                              hidden_states=tuple(hidden_states) if output_hidden_states else None)

    def _check_ids(self, input_ids) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (B, L) with L >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this model takes at most "
                             f"{self.config.max_positions} (tokenize with truncation=True)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # ---------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, variant: str | None = None) -> CLIPTextModel:
        """Load a transformers `text_encoder/` folder (config.json + model[.variant].safetensors or .bin)."""
        folder = Path(folder)
        cfg = CLIPTextConfig.from_dict(read_json(folder / "config.json"))
        weights = find_weights(folder, stems=("model", "pytorch_model"), variant=variant)
        model = build_on_meta(lambda: cls(cfg))
        load_weights(model, weights, transformers_keymap_for(TensorFile(weights)), dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json + model.safetensors under the hub's transformers names (`text_model.*`)."""
        save_component(folder, self.config.to_dict(), self, TRANSFORMERS_KEYS, "model.safetensors")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------------ weight names
def _transformers_rules(prefix: str) -> tuple[Rule, ...]:
    layer = prefix + "encoder.layers.{i}."
    return (
        Rule("token_embedding.weight", prefix + "embeddings.token_embedding.weight"),
        Rule("position_embedding.weight", prefix + "embeddings.position_embedding.weight"),
        Rule("layers.{i}.norm1.{rest}", layer + "layer_norm1.{rest}"),
        Rule("layers.{i}.attn.q.{rest}", layer + "self_attn.q_proj.{rest}"),
        Rule("layers.{i}.attn.k.{rest}", layer + "self_attn.k_proj.{rest}"),
        Rule("layers.{i}.attn.v.{rest}", layer + "self_attn.v_proj.{rest}"),
        Rule("layers.{i}.attn.out.{rest}", layer + "self_attn.out_proj.{rest}"),
        Rule("layers.{i}.norm2.{rest}", layer + "layer_norm2.{rest}"),
        Rule("layers.{i}.mlp.{rest}", layer + "mlp.{rest}"),  # fc1, fc2 keep their names
        Rule("final_layer_norm.{rest}", prefix + "final_layer_norm.{rest}"),
    )


# The hub file (saved by transformers 4): every name under `text_model.`, plus the old `position_ids` buffer.
TRANSFORMERS_KEYS = KeyMap("transformers CLIPTextModel (text_model.*)", _transformers_rules("text_model."),
                           ignore=("text_model.embeddings.position_ids",))
# transformers 5 saves the same tensors without the `text_model.` prefix.
TRANSFORMERS_V5_KEYS = KeyMap("transformers 5 CLIPTextModel", _transformers_rules(""),
                              ignore=("embeddings.position_ids", "text_model.embeddings.position_ids"))


def transformers_keymap_for(tensors) -> KeyMap:
    """TRANSFORMERS_KEYS if the file's names carry the `text_model.` prefix, else TRANSFORMERS_V5_KEYS."""
    prefixed = any(name.startswith("text_model.encoder.") for name in tensors)
    return TRANSFORMERS_KEYS if prefixed else TRANSFORMERS_V5_KEYS


def openclip_keys(num_layers: int = 23, prefix: str = "cond_stage_model.model.") -> KeyMap:
    """OpenCLIP text-tower names (the original LDM single file puts them under `cond_stage_model.model.`).

    OpenCLIP keeps q, k, v fused in `attn.in_proj_weight` [3D, D] (rows q, then k, then v). The file holds one block
    more than SD2 uses (`resblocks.{num_layers}`, the last of ViT-H's 24) plus the contrastive head
    (`text_projection`, `logit_scale`); those are skipped. A pipeline loading the whole single file passes only the
    tensors under `prefix` (the UNet, VAE and depth model are other components)."""
    block = prefix + "transformer.resblocks.{i}."
    rules = [
        Rule("token_embedding.weight", prefix + "token_embedding.weight"),
        Rule("position_embedding.weight", prefix + "positional_embedding"),  # a bare [77, D] parameter there
        Rule("layers.{i}.norm1.{rest}", block + "ln_1.{rest}"),
        Rule("layers.{i}.norm2.{rest}", block + "ln_2.{rest}"),
        Rule("layers.{i}.attn.out.{rest}", block + "attn.out_proj.{rest}"),
        Rule("layers.{i}.mlp.fc1.{rest}", block + "mlp.c_fc.{rest}"),
        Rule("layers.{i}.mlp.fc2.{rest}", block + "mlp.c_proj.{rest}"),
        Rule("final_layer_norm.{rest}", prefix + "ln_final.{rest}"),
    ]
    for k, name in enumerate("qkv"):
        rules += [Rule(f"layers.{{i}}.attn.{name}.weight", block + "attn.in_proj_weight", f"chunk:{k}/3"),
                  Rule(f"layers.{{i}}.attn.{name}.bias", block + "attn.in_proj_bias", f"chunk:{k}/3")]
    ignore = (f"{prefix}transformer.resblocks.{num_layers}.*", prefix + "text_projection", prefix + "logit_scale")
    return KeyMap(f"OpenCLIP text tower ({prefix}*)", tuple(rules), ignore=ignore)


OPENCLIP_LDM_KEYS = openclip_keys(num_layers=23)

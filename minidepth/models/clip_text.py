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

Weights load from the diffusers/transformers `text_encoder/` folder (`checkpoints/transformers_format.py`) or from
the `cond_stage_model.model.*` tensors of the original single-file checkpoint (`checkpoints/ldm_format.py`).

Shapes: B batch, L tokens (<= 77), D width, h heads, d head size (D = h d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, name_attention_layers
from .loadable import Loadable


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
        """stable-diffusion-2-depth's text encoder, OpenCLIP ViT-H-14's text tower with 23 of its 24 blocks: the
        defaults above (340,387,840 parameters)."""
        return cls()


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


# ------------------------------------------------------------------------------------------------ the model
class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B L D) -> (B L hidden) -> (B L D)


class CLIPLayer(nn.Module):
    """One pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). key_mask (B, L): True = a real token."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.num_heads, cfg.width // cfg.num_heads, qkv_bias=True, causal=True)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.hidden_act)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask)  # causal: token t sees tokens 0..t
        return x + self.mlp(self.norm2(x))


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor                       # (B, L, D), after final_layer_norm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layers + 1 of (B, L, D): embeddings, then each layer


class CLIPTextModel(nn.Module, Loadable):
    """Token ids (B, L) -> token features (B, L, D). See the module docstring for the equations."""

    def __init__(self, cfg: CLIPTextConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or CLIPTextConfig.sd2_depth()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        name_attention_layers(self)

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

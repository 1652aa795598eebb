"""The pipeline's adapter methods, with diffusers' names and semantics (`StableDiffusionLoraLoaderMixin`,
`TextualInversionLoaderMixin`):

    pipe.load_lora_weights("style.safetensors", adapter_name="style")    kohya / LyCORIS LoCon / diffusers / PEFT files
    pipe.set_adapters(["style", "detail"], adapter_weights=[0.8, 0.5])   mix adapters
    pipe(..., cross_attention_kwargs={"scale": 0.5})                     this call's LoRA strength (UNet and text encoder)
    pipe.fuse_lora(lora_scale=0.7) / pipe.unfuse_lora()                  W <- W + scale · B A and back
    pipe.disable_lora() / pipe.enable_lora() / pipe.unload_lora_weights()
    pipe.save_lora_weights(folder)                                       diffusers' format, alphas in its metadata
    pipe.load_textual_inversion("emb.pt", token="<tok>") / pipe.unload_textual_inversion()

Files are read and checked completely (minidepth.adapters.formats / textual_inversion) before any model is changed, so
an error leaves the pipeline as it was. The layers themselves are minidepth.adapters.lora.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path

import torch

from . import lora
from . import textual_inversion as ti
from ..checkpoints.hub import HUB_OPTIONS
from .formats import COMPONENTS, METADATA_KEY, LayerNames, read_lora

logger = logging.getLogger(__name__)


def _hub_options(method: str, kwargs: dict) -> dict:
    """diffusers' Hub download options (HUB_OPTIONS) out of `kwargs`; any other keyword is ignored with a warning."""
    rest = sorted(k for k in kwargs if k not in HUB_OPTIONS)
    if rest:
        logger.warning("%s: ignoring arguments %s", method, ", ".join(rest))
    return {k: v for k, v in kwargs.items() if k in HUB_OPTIONS}


class AdaptersMixin:
    """LoRA and textual inversion for a pipeline with `unet`, `text_encoder` and `tokenizer` attributes."""

    # ------------------------------------------------------------------------------------------ LoRA
    def _lora_models(self) -> dict:
        return {c: getattr(self, c, None) for c in COMPONENTS}

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                          adapter_name: str | None = None, **kwargs) -> None:
        """Add a LoRA (a file, a folder holding `weight_name` / pytorch_lora_weights.safetensors, a Hub repo id with
        `weight_name`, or a state dict) as adapter `adapter_name` (default "default_<n>") to the UNet and/or the text
        encoder. As in diffusers the new adapter becomes the only active one in the components it touches
        (`set_adapters` mixes several). Hub options as diffusers': cache_dir, revision, local_files_only, subfolder,
        token."""
        hub = _hub_options("load_lora_weights", kwargs)
        present = {n for names in self.get_list_adapters().values() for n in names}
        if adapter_name is None:
            adapter_name = next(f"default_{i}" for i in range(len(present) + 1) if f"default_{i}" not in present)
        elif adapter_name in present:
            raise ValueError(f"adapter name {adapter_name!r} is already in use; pick another adapter_name or "
                             "unload_lora_weights() first")
        models = self._lora_models()
        entries = read_lora(pretrained_model_name_or_path_or_dict, models, weight_name, **hub)  # raises before any change
        for e in entries:
            lora.add_adapter(models[e.component].get_submodule(e.layer), adapter_name, e.down, e.up, e.alpha,
                             e.up_bias, e.rank_stabilised)
        for component in {e.component for e in entries}:
            for _, layer in lora.lora_layers(models[component]):
                layer.lora.active = [adapter_name]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{"unet": [names], "text_encoder": [names]} for the components that have adapters."""
        out = {}
        for component, model in self._lora_models().items():
            names = {n: None for _, layer in lora.lora_layers(model) for n in layer.lora}
            if names:
                out[component] = list(names)
        return out

    def get_active_adapters(self) -> list[str]:
        """The active adapters of the text encoder if it has adapters, else of the UNet (what diffusers reports:
        each component keeps its own list, set by the last load that touched it or by set_adapters)."""
        active = []
        for model in self._lora_models().values():
            for _, layer in lora.lora_layers(model):
                active = list(layer.lora.active)
                break
        return active

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Make `adapter_names` the active adapters, in this order, with these weights: one number for all, one per
        adapter, or per adapter a dict {"unet": w, "text_encoder": w} (a missing component: 1.0) where the UNet's w
        may be block-wise as in diffusers: {"down": w, "mid": w, "up": {"block_1": [w0, w1, w2], ...}} (see
        `unet_block_weights`)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
        present = {n for ns in self.get_list_adapters().values() for n in ns}
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"set_adapters: adapter(s) {missing} not loaded (present: {sorted(present)})")
        per_component = {c: [] for c in COMPONENTS}
        for w in weights:
            if isinstance(w, dict) and set(w) - set(COMPONENTS):
                raise ValueError(f"set_adapters: weights per component are a dict with keys {list(COMPONENTS)}, got "
                                 f"{sorted(w)}")
            for c in COMPONENTS:
                v = w.get(c) if isinstance(w, dict) else w
                if isinstance(v, dict) and c != "unet":
                    raise ValueError(f"set_adapters: block-wise weights are for the UNet only; {c}: {v}")
                per_component[c].append(unet_block_weights(self.unet, v) if isinstance(v, dict) else v)
        to_file = LayerNames(self.unet, None).to_file["unet"]
        for component, model in self._lora_models().items():
            for ours, layer in lora.lora_layers(model):
                layer.lora.active = list(names)
                for name, w in zip(names, per_component[component]):
                    if isinstance(w, dict):
                        w = _block_weight(w, to_file.get(ours, ours))
                    if name in layer.lora:
                        layer.lora[name].adapter_weight = 1.0 if w is None else float(w)

    def disable_lora(self) -> None:
        """The models compute without their adapters (fused adapters are unfused first, as peft does)."""
        self.unfuse_lora()
        for model in self._lora_models().values():
            for _, layer in lora.lora_layers(model):
                layer.lora.enabled = False

    def enable_lora(self) -> None:
        for model in self._lora_models().values():
            for _, layer in lora.lora_layers(model):
                layer.lora.enabled = True

    def fuse_lora(self, components: list[str] = COMPONENTS, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs) -> None:
        """Add scale · B A of the active adapters (or `adapter_names`) into the weights, scale including
        `lora_scale`; generation then costs nothing extra. `safe_fusing`: refuse (unchanged) if a weight would
        become non-finite."""
        layers = [layer for c in components for _, layer in lora.lora_layers(self._lora_models().get(c))]
        biased = [n for layer in layers for n in (adapter_names or layer.lora.active)
                  if n in layer.lora and layer.lora[n].up_bias is not None and layer.bias is None]
        if biased:  # peft: "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias"
            raise ValueError(f"fuse_lora: adapter {biased[0]!r} has a bias on B for a layer without a bias of its "
                             "own, which cannot be fused; nothing fused (run it unfused)")
        if safe_fusing:
            for layer in layers:
                names = adapter_names or layer.lora.active
                for name in (n for n in names if n in layer.lora and n not in layer.lora.fused):
                    delta = layer.lora[name].delta_weight(layer.lora[name].scaling(lora_scale))
                    if not torch.isfinite(layer.weight.float() + delta).all():
                        raise ValueError(f"fuse_lora: adapter {name!r} would make non-finite weights; nothing fused")
        for layer in layers:
            lora.fuse(layer, adapter_names or layer.lora.active, lora_scale)

    def unfuse_lora(self, components: list[str] = COMPONENTS, **kwargs) -> None:
        """Put back the weights from before `fuse_lora` (exactly); the adapters run unfused again."""
        for c in components:
            for _, layer in lora.lora_layers(self._lora_models().get(c)):
                lora.unfuse(layer)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            for model in self._lora_models().values():
                for _, layer in list(lora.lora_layers(model)):
                    if name in layer.lora.fused:
                        raise ValueError(f"delete_adapters: {name!r} is fused; unfuse_lora() first")
                    lora.remove_adapter(layer, name)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the layers are the original modules again (fused weights stay fused, as in
        diffusers; `unfuse_lora()` first to get the original weights back)."""
        for model in self._lora_models().values():
            lora.remove_adapters(model)

    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                          weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
        """Write adapter `adapter_name` (default: the only one) in diffusers' format: unet.<layer>.lora_A.weight /
        lora_B.weight, text_encoder.text_model.<layer>..., with the ranks and alphas as peft LoraConfig metadata
        (diffusers' "lora_adapter_metadata"), so diffusers and minidepth reload it to the same result."""
        from safetensors.torch import save_file
        present = sorted({n for ns in self.get_list_adapters().values() for n in ns})
        if adapter_name is None:
            if len(present) != 1:
                raise ValueError(f"save_lora_weights: pass adapter_name= (loaded adapters: {present})")
            adapter_name = present[0]
        if adapter_name not in present:
            raise ValueError(f"save_lora_weights: no adapter {adapter_name!r} (loaded: {present})")
        names = LayerNames(self.unet, self.text_encoder)
        tensors, metadata = {}, {}
        for component, model in self._lora_models().items():
            layers = {}  # the file's layer path -> LoRA
            for ours, layer in lora.lora_layers(model):
                if adapter_name in layer.lora:
                    layers[names.to_file[component][ours]] = layer.lora[adapter_name]
            for path, adapter in layers.items():
                tensors[f"{component}.{path}.lora_A.weight"] = adapter.down.detach().cpu().contiguous()
                tensors[f"{component}.{path}.lora_B.weight"] = adapter.up.detach().cpu().contiguous()
                if adapter.up_bias is not None:
                    tensors[f"{component}.{path}.lora_B.bias"] = adapter.up_bias.detach().cpu().contiguous()
            if layers:
                config = _lora_config({p.removeprefix("text_model."): a for p, a in layers.items()})
                metadata.update({f"{component}.{k}": v for k, v in config.items()})
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / weight_name), metadata={"format": "pt",
                                                                 METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        return folder / weight_name

    # ------------------------------------------------------------------------------------------ textual inversion
    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str] | None = None,
                               weight_name: str | None = None, **kwargs) -> None:
        """Add the embedding(s) of a file / folder / dict / tensor (or a list of them, with a list of tokens) as new
        words. Multi-vector embeddings become <tok>, <tok>_1, ...; a prompt's "<tok>" is expanded to all of them.
        A source may also be a Hub repo id (e.g. "sd-concepts-library/cat-toy"; Hub options as load_lora_weights)."""
        hub = _hub_options("load_textual_inversion", kwargs)
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) else \
            [pretrained_model_name_or_path]
        tokens = token if isinstance(token, list) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise ValueError(f"load_textual_inversion: {len(sources)} embeddings but {len(tokens)} tokens")
        pairs = []
        for source, tok in zip(sources, tokens):
            contents, where = ti.read_embedding_file(source, weight_name, **hub)
            pairs += ti.expand(*ti.token_and_vectors(contents, tok, where))
        where = sources[0] if len(sources) == 1 and not isinstance(sources[0], (dict, torch.Tensor)) else \
            "the embeddings"
        ti.check_new_tokens(pairs, self.tokenizer, self.text_encoder.config.width, str(where))
        if getattr(self, "_ti_original", None) is None:  # restored by unload_textual_inversion
            self._ti_original = (self.text_encoder.token_embedding, self.text_encoder.config)
        ids = self.tokenizer.add_tokens([t for t, _ in pairs])
        ti.set_token_rows(self.text_encoder, ids, [v for _, v in pairs])

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Remove the added words `tokens` (default: all) and their embedding rows; the others are renumbered as in
        diffusers. Removing all gives back the original token_embedding module and tokenizer."""
        added = self.tokenizer.added_tokens_encoder
        remove = set(added) if tokens is None else {tokens} if isinstance(tokens, str) else set(tokens)
        if tokens is not None and not remove & set(added):
            raise ValueError(f"unload_textual_inversion: none of {sorted(remove)} was added")
        keep = [(t, self.text_encoder.token_embedding.weight[i].detach().clone()) for t, i in added.items()
                if t not in remove]
        if getattr(self, "_ti_original", None) is not None:
            self.text_encoder.token_embedding, self.text_encoder.config = self._ti_original
            self._ti_original = None
        self.tokenizer.remove_added_tokens()
        if keep:
            self._ti_original = (self.text_encoder.token_embedding, self.text_encoder.config)
            ids = self.tokenizer.add_tokens([t for t, _ in keep])
            ti.set_token_rows(self.text_encoder, ids, [v for _, v in keep])

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer=None):
        """Expand multi-vector textual-inversion tokens in a prompt or a list of prompts (diffusers' name)."""
        tokenizer = tokenizer or self.tokenizer
        if not getattr(tokenizer, "added_tokens_encoder", None):
            return prompt
        if isinstance(prompt, list):
            return [ti.convert_prompt(p, tokenizer) for p in prompt]
        return ti.convert_prompt(prompt, tokenizer)


def _lora_config(layers: dict[str, lora.LoRA]) -> dict:
    """peft LoraConfig fields for these layers: the most common rank and alpha, patterns for the others."""
    ranks = {path: a.rank for path, a in layers.items()}
    alphas = {path: a.alpha for path, a in layers.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    mixed = {flag for a in layers.values() for flag in ("rank_stabilised", "up_bias")
             if len({getattr(b, flag) is not None and getattr(b, flag) is not False for b in layers.values()}) > 1}
    if mixed:  # peft's config has one use_rslora and one lora_bias per component
        raise ValueError(f"save_lora_weights: the adapter mixes layers with and without {', '.join(sorted(mixed))}; "
                         "peft's format cannot say that")
    first = next(iter(layers.values()))
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers), "use_dora": False,
            "use_rslora": first.rank_stabilised, "lora_bias": first.up_bias is not None,
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha}}


# ------------------------------------------------------------------------------------------------ block-wise weights
def unet_block_weights(unet, weights: dict, default: float = 1.0) -> dict[str, float]:
    """diffusers' block-wise LoRA weights for the UNet -> {diffusers module path of a spatial transformer: weight}.

        {"down": 0.5, "mid": 1.0, "up": {"block_1": [0.2, 0.4, 0.6], "block_2": 1.0}}

    "down" / "up": one number for every block that has attention, or per block ("block_<i>", the diffusers index of
    the down / up block) a number or one number per transformer (layers_per_block of them down, one more up); "mid":
    the middle block's transformer. Blocks not named get `default`. The same expansion as diffusers'
    `_maybe_expand_lora_scales`, so the same file and dict give the same image."""
    unknown = sorted(set(weights) - {"down", "mid", "up"})
    if unknown:
        raise ValueError(f"set_adapters: block-wise UNet weights take the keys down, mid, up; got {unknown}")
    cfg = unet.config
    levels = len(cfg.cross_attention)
    with_attention = {"down": [i for i in range(levels) if cfg.cross_attention[i]],
                      "up": [i for i in range(levels) if cfg.cross_attention[levels - 1 - i]]}
    per_block = {"down": cfg.layers_per_block, "up": cfg.layers_per_block + 1}
    mid = weights.get("mid", default)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"set_adapters: 'mid' takes one weight, got {mid}")
        mid = mid[0]
    out = {"mid_block.attentions.0": mid}
    for side in ("up", "down"):
        given = weights.get(side, default)
        blocks = given if isinstance(given, dict) else {f"block_{i}": given for i in with_attention[side]}
        for i in with_attention[side]:
            w = blocks.get(f"block_{i}", default)
            w = w * per_block[side] if isinstance(w, list) and len(w) == 1 else w
            if not isinstance(w, list):
                w = [w] * per_block[side]
            if len(w) != per_block[side]:
                raise ValueError(f"set_adapters: {side}.block_{i} takes {per_block[side]} weights (one per "
                                 f"transformer), got {len(w)}")
            out.update({f"{side}_blocks.{i}.attentions.{j}": v for j, v in enumerate(w)})
    return out


def _block_weight(weights: dict[str, float], path: str) -> float:
    """The weight of the layer at diffusers path `path`: the first block whose path it lies in; a ResNet or sampler
    layer takes the weight of the transformer with its index in the same block (diffusers' rule); 1.0 elsewhere."""
    for block, w in weights.items():
        if block in path:
            return w
    parts = path.split(".")
    if len(parts) < 4:  # conv_in, time_embedding.*, conv_out: diffusers fails here (IndexError); no block: 1.0
        return 1.0
    return weights.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)

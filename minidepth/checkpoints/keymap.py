"""Declarative weight-name maps: how a checkpoint's tensor names become our parameter names.

A `KeyMap` is data: an ordered list of `Rule`s. Each rule says "our parameter `target` comes from the checkpoint
tensor(s) `source`, through `transform`". Patterns hold placeholders:

    {i}, {j}, {k}, ...   an integer index (matches `[0-9]+`), copied as is into the source pattern
    {rest}               any dotted remainder (matches `.+`), for "everything below this prefix keeps its name"

Where two formats number blocks differently (LDM's `input_blocks.4` is our `down_blocks.1.resnets.0`), the map's author
writes the concrete rules out in a plain Python loop, so that reading the map shows each pair of names.

Rules are matched against OUR names, first match wins (so list specific rules before general ones). Because matching is
always done on our side, the same table serves both directions: loading (checkpoint -> model) and saving
(model -> checkpoint names).

Transforms (the only reshaping weights ever need here):
    "copy"      the tensor as stored
    "squeeze"   a 1x1 convolution kernel [out, in, 1, 1] used as a linear weight [out, in] (LDM VAE attention)
    "cat"       several source tensors concatenated along dim 0 (separate q, k, v -> one fused qkv)
    "chunk:K/N" row block K of N equal blocks along dim 0 (one fused qkv -> separate q, k, v)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class Rule:
    target: str
    source: str | tuple[str, ...]
    transform: str = "copy"
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        parts, last = [], 0
        for m in _PLACEHOLDER.finditer(self.target):
            parts.append(re.escape(self.target[last:m.start()]))
            name = m.group(1)
            if not name.isidentifier():
                raise ValueError(f"target pattern {self.target!r}: placeholder {{{name}}} must be a plain name")
            parts.append(f"(?P<{name}>.+)" if name == "rest" else f"(?P<{name}>[0-9]+)")
            last = m.end()
        parts.append(re.escape(self.target[last:]))
        object.__setattr__(self, "_regex", re.compile("".join(parts) + r"\Z"))
        if self.transform not in ("copy", "squeeze", "cat") and not re.fullmatch(r"chunk:\d+/\d+", self.transform):
            raise ValueError(f"unknown transform {self.transform!r} in rule for {self.target!r}")
        if (self.transform == "cat") != isinstance(self.source, tuple):
            raise ValueError(f"rule for {self.target!r}: 'cat' needs a tuple of sources, other transforms one source")
        captured = set(self._regex.groupindex)
        for source in self.source if isinstance(self.source, tuple) else (self.source,):
            unknown = set(_PLACEHOLDER.findall(source)) - captured
            if unknown:
                raise ValueError(f"rule for {self.target!r}: source {source!r} uses {sorted(unknown)}, which the "
                                 "target does not capture (write the concrete names out in a loop instead)")

    def sources_for(self, name: str) -> tuple[str, ...] | None:
        """The checkpoint names that feed our parameter `name`, or None when this rule does not apply to it."""
        m = self._regex.match(name)
        if m is None:
            return None
        env = m.groupdict()
        fill = lambda pattern: _PLACEHOLDER.sub(lambda p: env[p.group(1)], pattern)  # noqa: E731
        return tuple(fill(s) for s in (self.source if isinstance(self.source, tuple) else (self.source,)))

    # -- tensors -----------------------------------------------------------------------------------------------------
    def to_model(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Checkpoint tensor(s) -> our parameter."""
        if self.transform == "cat":
            return torch.cat(tensors, dim=0)
        (t,) = tensors
        if self.transform == "squeeze":
            return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
        if self.transform.startswith("chunk:"):
            k, n = map(int, self.transform[len("chunk:"):].split("/"))
            return t.chunk(n, dim=0)[k]
        return t

    def to_checkpoint(self, t: torch.Tensor, stored_shapes: list[tuple[int, ...]] | None = None) -> list[torch.Tensor]:
        """Our parameter -> checkpoint tensor(s) (the inverse of `to_model`; `chunk` rules are merged by the caller)."""
        if self.transform == "cat":
            return list(t.chunk(len(self.source), dim=0))
        if self.transform == "squeeze":
            return [t[:, :, None, None] if t.ndim == 2 else t]
        return [t]


@dataclass(frozen=True)
class KeyMap:
    """An ordered rule table for one component in one source format.

    `ignore` lists checkpoint names (fnmatch globs) that are known, harmless and skipped, e.g. the
    `text_model.embeddings.position_ids` buffer transformers used to save. Everything else must be used exactly once.
    """
    name: str
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    def rule_for(self, param_name: str) -> tuple[Rule, tuple[str, ...]]:
        for rule in self.rules:
            sources = rule.sources_for(param_name)
            if sources is not None:
                return rule, sources
        raise KeyError(f"key map {self.name!r} has no rule for parameter {param_name!r}")

    def is_ignored(self, source_name: str) -> bool:
        return any(fnmatch.fnmatchcase(source_name, pattern) for pattern in self.ignore)


IDENTITY = (Rule("{rest}", "{rest}"),)


def prefixed(prefix: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The same rules with `prefix` put in front of every source pattern (e.g. "first_stage_model.")."""
    def add(s):
        return tuple(prefix + x for x in s) if isinstance(s, tuple) else prefix + s
    return tuple(Rule(r.target, add(r.source), r.transform) for r in rules)

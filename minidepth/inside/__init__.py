"""See inside a generation: the architecture as a table, attention maps per word, a denoising filmstrip.

    tour.py            `architecture_tour(size=512)`: per model and block the output shape, parameters and GFLOP
                       (torch's FLOP counter on the meta device: no weights, no memory); `minidepth tour`
    attention_maps.py  `AttentionRecorder` (`record_attention(pipe)`): cross-attention per word, DAAM-style
    filmstrip.py       `FilmstripRecorder` (`record_filmstrip(pipe)`): the predicted clean image x0 during denoising
    cli.py             the command-line side: `minidepth tour`, `generate --filmstrip --attention-maps`

Nothing here changes what the pipeline computes, so images are bit-identical with and without recording. The
recorders are observers of the pipeline (minidepth/observers.py): entering one adds it with `pipe.observing(...)`, and
the pipeline's events (prompt encoded, step done, decoded, ...) hand it the tensors to read. Below the pipeline they
watch modules only: a forward hook on the depth estimator (the filmstrip's depth) and an attention processor on the
cross-attention layers that returns the layer's own product (the attention maps). No pipeline method is replaced
(tests/test_observers.py checks it).
"""

import re


def safe_name(word: str) -> str:
    """A word as a file-name part (`OUT-attn-<word>.png`): letters, digits, '-' and '_' (others become '_').
    Here, not in attention_maps.py, so that the CLI plans its outputs without importing torch."""
    return re.sub(r"[^\w-]+", "_", word.strip()).strip("_") or "word"

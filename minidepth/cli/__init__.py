"""The front ends: the `minidepth` command and everything only it needs. Nothing outside this folder imports it.

    command.py       `minidepth` and its subcommands generate, depth, info, schedulers, download
    args.py          the argument parser, option tables and the checks that need no model (no torch imported)
    files.py         reading photos and depth maps for the command line, planned outputs, atomic writes, grids
    model.py         --model: a folder or a Hub repo id, the checkpoint's limits
    png_metadata.py  the settings written into each PNG and read back by `generate --from`
    inside.py        `minidepth tour`, `generate --filmstrip / --attention-maps`
    batch.py         `minidepth batch` (+ batch_jobs.py: the jobs file)
    serve.py         `minidepth serve`: the local web page (gradio)
    parity.py        `minidepth parity`
    convert.py       `minidepth convert`
    train.py         `minidepth train-lora`
"""

from .command import main

__all__ = ["main"]

"""`Loadable`: the methods users know (`UNet.from_pretrained(folder)`, `from_single_file`, `save_pretrained`), with
no file format in the model files.

A model file describes an architecture and nothing else: it imports nothing of minidepth outside `models/` (and
`noise`). Reading and writing weights lives on the checkpoint side (minidepth/checkpoints/pretrained.py), which
registers itself here when `minidepth.checkpoints` is imported: the pipeline, every loader and
`from minidepth import UNet` import it. The checkpoint side finds a class's file format along its MRO, so a subclass
that changes one block (`class MyUNet(UNet)`) loads the same files.

    unet = UNet.from_pretrained("weights/sd2-depth/unet")                 # = checkpoints.from_pretrained(UNet, ...)
"""

from __future__ import annotations

import os


class Loadable:
    """Mixed into the four networks (UNet, AutoencoderKL, CLIPTextModel, DPTDepthModel)."""

    checkpoint_side = None  # the module that does the work: minidepth.checkpoints.pretrained, set when it is imported

    @classmethod
    def _checkpoints(cls):
        if Loadable.checkpoint_side is None:
            raise RuntimeError(f"{cls.__name__}: loading and saving weights lives in minidepth.checkpoints, which is not "
                               "imported yet; `import minidepth.checkpoints` first (or `from minidepth import "
                               f"{cls.__name__}`)")
        return Loadable.checkpoint_side

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **options):
        """A component folder (config.json + weights): see `minidepth.checkpoints.pretrained.from_pretrained`."""
        return cls._checkpoints().from_pretrained(cls, folder, **options)

    @classmethod
    def from_single_file(cls, path, config=None, **options):
        """This network's part of an original checkpoint: see `minidepth.checkpoints.pretrained.from_single_file`."""
        return cls._checkpoints().from_single_file(cls, path, config, **options)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the component folder the reference library reads: see `minidepth.checkpoints.pretrained`."""
        self._checkpoints().save_pretrained(self, folder)

    def num_parameters(self) -> int:
        """The number of weights (parameters; buffers excluded)."""
        return sum(p.numel() for p in self.parameters())

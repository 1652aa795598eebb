"""A researcher subclasses a network to change one block, and the subclass loads the same files as its parent
(issue #25): `from_pretrained` on a component folder, `from_single_file` on the original single file, and
`save_pretrained` back. The checkpoint side finds the format along the class's MRO (minidepth/checkpoints/pretrained.py);
the model files know nothing about files (minidepth/models/loadable.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minidepth.checkpoints.single_file import convert, network_configs
from minidepth.models.autoencoder import AutoencoderKL
from minidepth.models.blocks import ResnetBlock
from minidepth.models.clip_text import MLP as TextMLP
from minidepth.models.clip_text import CLIPTextModel
from minidepth.models.dpt import MLP as ViTMLP
from minidepth.models.dpt import DPTDepthModel
from minidepth.models.unet import UNet


# ------------------------------------------------------------------------------------------------ the changed blocks
class GELUResnetBlock(ResnetBlock):
    """The same weights as a ResnetBlock, GELU where it has SiLU: a typical one-block experiment."""

    @classmethod
    def like(cls, block: ResnetBlock) -> GELUResnetBlock:
        temb = block.time_emb_proj.in_features if block.time_emb_proj is not None else None
        return cls(block.norm1.num_channels, block.conv1.out_channels, temb, block.norm1.num_groups, block.norm1.eps)

    def forward(self, x, temb=None):
        h = self.conv1(F.gelu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.gelu(temb))[:, :, None, None]
        h = self.conv2(F.gelu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class ReLUTextMLP(TextMLP):
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class ReLUViTMLP(ViTMLP):
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class MyUNet(UNet):
    def __init__(self, config=None):
        super().__init__(config)
        self.mid_block.resnets[0] = GELUResnetBlock.like(self.mid_block.resnets[0])


class MyVAE(AutoencoderKL):
    def __init__(self, config=None):
        super().__init__(config)
        self.decoder.mid_block.resnet_1 = GELUResnetBlock.like(self.decoder.mid_block.resnet_1)


class MyTextEncoder(CLIPTextModel):
    def __init__(self, config=None):
        super().__init__(config)
        last = self.layers[-1].mlp
        self.layers[-1].mlp = ReLUTextMLP(last.fc1.in_features, last.fc1.out_features, self.config.hidden_act)


class MyDepthModel(DPTDepthModel):
    def __init__(self, config=None):
        super().__init__(config)
        last = self.backbone.blocks[-1].mlp
        self.backbone.blocks[-1].mlp = ReLUViTMLP(last.fc1.in_features, last.fc1.out_features)


def _run(name: str, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if name == "unet":
            c = model.config
            return model(torch.randn(1, c.in_channels, 8, 8, generator=g), 10,
                         torch.randn(1, 77, c.cross_attention_dim, generator=g))
        if name == "vae":
            return model.decode(torch.randn(1, 4, 8, 8, generator=g))
        if name == "text_encoder":
            return model(torch.randint(0, 1000, (1, 77), generator=g)).last_hidden_state
        return model(torch.randn(1, 3, 64, 64, generator=g))


NETWORKS = {"unet": (UNet, MyUNet), "vae": (AutoencoderKL, MyVAE), "text_encoder": (CLIPTextModel, MyTextEncoder),
            "depth_estimator": (DPTDepthModel, MyDepthModel)}


@pytest.fixture(scope="module")
def single_file(tiny_checkpoint, tmp_path_factory) -> Path:
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("subclass") / "tiny-depth.safetensors")


def _own_memory(model):
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diff = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert diff == 0, f"weights differ by up to {diff}"


@pytest.mark.parametrize("name", list(NETWORKS))
def test_subclass_loads_folder_and_single_file_and_runs(name, tiny_checkpoint, single_file, tmp_path):
    parent_cls, child_cls = NETWORKS[name]
    parent = parent_cls.from_pretrained(Path(tiny_checkpoint) / name)
    child = child_cls.from_pretrained(Path(tiny_checkpoint) / name)
    assert type(child) is child_cls
    _same_weights(parent, child)  # every tensor of the file, strictly, into the changed architecture

    config = network_configs(tiny_checkpoint)[name]
    from_file = child_cls.from_single_file(single_file, config)
    assert type(from_file) is child_cls
    _same_weights(child, from_file)

    out_parent, out_child = _run(name, parent), _run(name, child)
    assert torch.isfinite(out_child).all()
    assert out_child.shape == out_parent.shape
    changed = (out_child - out_parent).abs().max().item()
    assert changed > 1e-6, f"the changed block made no difference ({changed})"  # the subclass really runs its block
    # the same weights give the same numbers once both live in memory of their own (weights read straight from a file
    # can sit at alignments that send a kernel down another SIMD path: ~1e-6 differences, measured)
    assert torch.equal(_run(name, _own_memory(from_file)), _run(name, _own_memory(child)))

    child.save_pretrained(tmp_path / name)  # and writes the format its parent writes
    _same_weights(child, parent_cls.from_pretrained(tmp_path / name))


def test_a_class_that_is_no_network_says_so(tiny_checkpoint):
    from minidepth.checkpoints import from_pretrained

    class NotANetwork(torch.nn.Module):
        pass
    with pytest.raises(TypeError, match="NotANetwork is not one of the networks minidepth can load"):
        from_pretrained(NotANetwork, Path(tiny_checkpoint) / "unet")

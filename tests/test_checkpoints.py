"""The strict key-map loader: rules, transforms, inverse export, and every way a weight file can be wrong."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minidepth.checkpoints import (IDENTITY, CheckpointError, KeyMap, Rule, TensorFile, build_on_meta,
                                   export_state_dict, find_weights, load_weights, prefixed)


class Toy(nn.Module):
    """Two blocks with separate q/k/v projections, a fused-qkv layer and an output linear."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "k": nn.Linear(4, 4), "v": nn.Linear(4, 4)})
                                    for _ in range(2))
        self.fused = nn.Linear(4, 12)
        self.out = nn.Linear(4, 3)


# Checkpoint layout: blocks stored in reverse order with a fused in_proj; "fused" stored as three tensors;
# "out" stored as a 1x1 convolution.
TOY_KEYS = KeyMap("toy", (
    *(Rule(f"blocks.{i}.{name}.{param}", f"layers.{1 - i}.in_proj.{param}", f"chunk:{k}/3")
      for i in range(2) for k, name in enumerate("qkv") for param in ("weight", "bias")),
    Rule("fused.{rest}", ("sep.q.{rest}", "sep.k.{rest}", "sep.v.{rest}"), "cat"),
    Rule("out.weight", "proj.weight", "squeeze"),
    Rule("out.bias", "proj.bias"),
), ignore=("position_ids",))


@pytest.fixture
def toy_file(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    tensors = export_state_dict(model, TOY_KEYS)
    tensors["position_ids"] = torch.arange(5)[None]
    path = tmp_path / "toy.safetensors"
    save_file(tensors, str(path))
    return model, path, tensors


def test_a_source_placeholder_the_target_does_not_capture_is_refused():
    with pytest.raises(ValueError, match=r"uses \['1-i'\], which the target does not capture"):
        Rule("blocks.{i}.q.weight", "layers.{1-i}.in_proj.weight")


def test_export_then_load_round_trips_every_transform(toy_file):
    model, path, tensors = toy_file
    assert tensors["layers.1.in_proj.weight"].shape == (12, 4)  # chunked rows were merged back
    assert tensors["proj.weight"].shape == (3, 4, 1, 1)  # squeezed linear was stored as a conv kernel
    loaded = load_weights(build_on_meta(Toy), path, TOY_KEYS)
    for name, ref in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert torch.equal(got, ref), f"{name}: max abs diff {(got - ref).abs().max():.3g}"
    assert torch.equal(loaded.blocks[0].k.weight, tensors["layers.1.in_proj.weight"][4:8])


def test_load_into_dtype_and_device(toy_file):
    _, path, _ = toy_file
    loaded = load_weights(build_on_meta(Toy), path, TOY_KEYS, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


def test_identity_and_prefixed_maps(tmp_path):
    model = Toy()
    path = tmp_path / "pref.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_weights(build_on_meta(Toy), path, KeyMap("prefixed", prefixed("model.", IDENTITY)))
    assert torch.equal(loaded.out.weight, model.out.weight)


def _error(path, keymap=TOY_KEYS):
    with pytest.raises(CheckpointError) as info:
        load_weights(build_on_meta(Toy), path, keymap)
    return str(info.value)


def test_missing_tensor_is_named(toy_file, tmp_path):
    _, _, tensors = toy_file
    del tensors["layers.0.in_proj.bias"]
    save_file(tensors, str(tmp_path / "m.safetensors"))
    msg = _error(tmp_path / "m.safetensors")
    assert "missing tensors" in msg and "layers.0.in_proj.bias" in msg and "blocks.1.q.bias" in msg


def test_unexpected_tensor_is_named(toy_file, tmp_path):
    _, _, tensors = toy_file
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "u.safetensors"))
    msg = _error(tmp_path / "u.safetensors")
    assert "1 unexpected tensors" in msg and "extra.weight" in msg


def test_shape_mismatch_is_named(toy_file, tmp_path):
    _, _, tensors = toy_file
    tensors["proj.bias"] = torch.zeros(5)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    msg = _error(tmp_path / "s.safetensors")
    assert "shape mismatches" in msg and "proj.bias" in msg and "[5]" in msg and "[3]" in msg


def test_many_problems_are_counted_not_dumped(tmp_path):
    save_file({f"junk.{i}": torch.zeros(1) for i in range(30)}, str(tmp_path / "j.safetensors"))
    msg = _error(tmp_path / "j.safetensors")
    assert "30 unexpected tensors" in msg and "and 22 more" in msg


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_weights(build_on_meta(Toy), tmp_path / "nothing.safetensors", TOY_KEYS)
    with pytest.raises(FileNotFoundError, match="looked for model.safetensors, model.bin"):
        find_weights(tmp_path, ("model",))


def test_truncated_and_corrupt_safetensors(toy_file, tmp_path):
    _, path, _ = toy_file
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(256))
    for name in ("trunc.safetensors", "garbage.safetensors"):
        with pytest.raises(CheckpointError, match=name):
            load_weights(build_on_meta(Toy), tmp_path / name, TOY_KEYS)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/minidepth-pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"out.weight": _Evil()}, f)
    torch.save({"a": _Evil()}, tmp_path / "evil2.bin")
    for p in (path, tmp_path / "evil2.bin"):
        with pytest.raises(CheckpointError, match="weights_only=True"):
            TensorFile(p)
    assert not os.path.exists("/tmp/minidepth-pwned")


def test_bin_and_ckpt_pickles_of_tensors_load(toy_file, tmp_path):
    model, _, tensors = toy_file
    torch.save(tensors, tmp_path / "w.bin")
    torch.save({"state_dict": tensors, "global_step": 3}, tmp_path / "w.ckpt")
    for name in ("w.bin", "w.ckpt"):
        loaded = load_weights(build_on_meta(Toy), tmp_path / name, TOY_KEYS)
        assert torch.equal(loaded.fused.weight, model.fused.weight)


def test_find_weights_prefers_safetensors_and_variant(tmp_path):
    for name in ("model.bin", "model.safetensors", "model.fp16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert find_weights(tmp_path, ("model",)).name == "model.safetensors"
    assert find_weights(tmp_path, ("model",), variant="fp16").name == "model.fp16.safetensors"


def test_bad_rules_are_rejected():
    with pytest.raises(ValueError, match="unknown transform"):
        Rule("a", "b", "transpose")
    with pytest.raises(ValueError, match="tuple of sources"):
        Rule("a", "b", "cat")
    with pytest.raises(KeyError, match="no rule for parameter"):
        KeyMap("empty", ()).rule_for("x.weight")


def test_resolve_checkpoint_offline_names_the_fetch_command(tmp_path):
    from minidepth.checkpoints.hub import resolve_checkpoint
    with pytest.raises(FileNotFoundError, match="minidepth download --model someone/some-model"):
        resolve_checkpoint("someone/some-model", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repo id"):
        resolve_checkpoint(tmp_path / "missing" / "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        resolve_checkpoint(tmp_path / "empty")

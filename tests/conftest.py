"""Test tiers and shared fixtures.

- default: tiny-config unit and parity tests (seconds each);
- `official`: the real SD2-depth architecture sizes (random weights), slower; CI runs them too. They hold one
  official-size model or pipeline at a time (a pipeline is ~5.5 GB in float32): the reference's outputs first, its
  model freed (`del` + `gc.collect()`), then minidepth's (CI's budget for the whole run: 12 GB peak RSS);
- `gpu`: needs CUDA, skipped without it (the same parity checks on the accelerator).

Checkpoints are built by `tests/factory.py` once per session (or once per `MINIDEPTH_TEST_CACHE` folder).
"""

import shutil

import pytest
import torch

import factory

# Model classes get from_pretrained & co. from minidepth.checkpoints once it is imported (models/loadable.py): the
# tests use them as a user who imported the pipeline or `from minidepth import UNet` would. (A fresh process without
# it gets a clear error: tests/test_package.py::test_loading_without_the_checkpoint_side_says_what_to_import.)
import minidepth.checkpoints  # noqa: E402,F401,I001
import parity


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    lines = parity.summary_lines()
    if lines:
        terminalreporter.write_sep("=", "measured parity (minidepth vs diffusers/transformers)")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    # The per-session cache holds several GB at the official size: remove it unless the user chose a folder.
    if factory._SESSION_DIR is not None:
        shutil.rmtree(factory._SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """A complete tiny random-weight checkpoint folder in the hub layout."""
    return factory.cached_checkpoint("tiny")

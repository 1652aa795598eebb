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


@pytest.fixture
def own_process(request) -> bool:
    """For the heaviest official-size tests: run the test again in a fresh Python process and return True (the test
    body then returns at once); in that process, return False (the body runs). Its peak memory is then its own, not
    added to what the whole session's process has gathered (CI's budget is 12 GB peak RSS for the run; measured: the
    single-file test peaks at 7.3 GB alone but took the session to 12.6 GB). The checkpoint cache is shared."""
    import os
    import subprocess
    import sys
    if os.environ.get("MINIDEPTH_OWN_PROCESS") == request.node.nodeid:
        return False
    env = {**os.environ, "MINIDEPTH_OWN_PROCESS": request.node.nodeid,
           "MINIDEPTH_TEST_CACHE": str(factory.cache_root())}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                         env=env, capture_output=True, text=True, cwd=request.config.rootpath)
    assert out.returncode == 0, f"{request.node.nodeid} in its own process:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    return True


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """A complete tiny random-weight checkpoint folder in the hub layout."""
    return factory.cached_checkpoint("tiny")


@pytest.fixture(autouse=True, scope="module")
def _memory_back_between_modules():
    """After each test file: collect garbage and hand freed heap back to the system (glibc keeps freed blocks in the
    process, where they count in the resident memory the next official-size test starts from; CI's budget for the
    whole run is 12 GB peak RSS). With MINIDEPTH_RSS_LOG=FILE, each file's peak so far is appended there."""
    yield
    import ctypes
    import gc
    import os
    import resource
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    log = os.environ.get("MINIDEPTH_RSS_LOG")
    if log:
        with open(log, "a") as f:
            rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2 ** 20
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split('::')[0]} rss {rss} MB, peak {peak} MB, "
                    f"children's peak {children} MB\n")

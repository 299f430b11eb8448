"""Test setup shared by the whole suite.

- Without a CUDA device the Triton kernels run under the interpreter. ``TRITON_INTERPRET`` is
  read when ``@triton.jit`` decorates, so it is set here, before any kernel module is imported.
- ``nan_empty``: makes ``torch.empty``/``empty_like`` return NaN-filled float tensors for one test,
  so a kernel that skips a write fails (fla's habit).
- ``@pytest.mark.gpu``: skipped with a reason when there is no CUDA device.
- With a CUDA device, every test that calls a Triton path builds its tensors on
  ``helpers.DEVICE`` (CUDA), and TF32 is off for the whole run: the fp64 baselines and the
  "plain PyTorch in the same dtype" of the 2x rule must be IEEE fp32, and the Triton kernels ask
  ``wildactor_kernels._utils.tf32_allowed()`` to pick IEEE (not TF32) dots for fp32 inputs.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

if HAS_CUDA:
    # The legacy setters keep the legacy and the new (fp32_precision) TF32 state in step.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")
    config.addinivalue_line("markers", "slow: longer tests (still part of the default run)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nan_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point() and not t.is_meta:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield
    # torch's device context (``with torch.device("meta")``) caches its set of factory functions on
    # first use; filled while torch.empty was patched (e.g. by a torch.compile trace in a test using
    # this fixture), it would hold the patch and later contexts would stop applying to torch.empty.
    _clear_device_constructors()


def _clear_device_constructors() -> None:
    from torch.utils import _device

    cached = getattr(_device, "_device_constructors", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

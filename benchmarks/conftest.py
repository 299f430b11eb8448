"""pytest-benchmark setup for ``pytest benchmarks --benchmark-only``.

These files are not part of the test suite (``python -m pytest -q tests`` collects ``tests/``
only). On CUDA the ops run their default backend (``"auto"``: the Triton kernels) in bf16; on the
CPU the plain-PyTorch reference in fp32 (the Triton interpreter is for correctness, not timing).
Every timed call ends with a device synchronisation, so CUDA work is inside the measurement.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def backend() -> str:
    return "auto" if HAS_CUDA else "reference"


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    return torch.bfloat16 if HAS_CUDA else torch.float32


@pytest.fixture
def synced(device):
    """``synced(fn)`` -> a callable running ``fn`` and waiting for the device."""

    def wrap(fn):
        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        return call

    return wrap


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stamp pytest-benchmark's JSON with the same environment record as the suite's rows."""
    from benchmarks.harness import env_record

    machine_info["wildactor_env"] = env_record()

"""Kernel tests run on a CUDA GPU when there is one, else in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set when `kernels` (which decorates the kernels) is first imported: this conftest sets it,
imports `kernels`, and puts the variable back, so other test folders never see it (with it set, the backend would
offer the Triton runner everywhere); the tests of this folder get it again from an autouse fixture (the Triton
runner and `--kernels triton` read it). Nothing outside tests/kernels imports `kernels` at collection time.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "kernels" in sys.modules and not sys.modules["kernels"].INTERPRET:
        raise pytest.UsageError("`kernels` was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1;"
                                " import it lazily elsewhere, or set TRITON_INTERPRET=1 for the whole run")
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import kernels
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous
else:
    import kernels

DEVICE = "cpu" if kernels.INTERPRET else "cuda"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: large shapes, run on a CUDA GPU only (skipped elsewhere)")


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and (kernels.INTERPRET or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU without TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if kernels.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    return DEVICE

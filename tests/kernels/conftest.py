"""Kernel tests run on a CUDA GPU when there is one, else in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before `kernels` (which decorates the kernels) is first imported; this conftest is
imported before any test module of this folder, and nothing outside `tests/kernels` imports `kernels` at
collection time (the Triton runner imports it lazily).
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "kernels" in sys.modules and not sys.modules["kernels"].INTERPRET:
        raise pytest.UsageError("`kernels` was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1;"
                                " import it lazily elsewhere, or set TRITON_INTERPRET=1 for the whole run")

import kernels  # noqa: E402

DEVICE = "cpu" if kernels.INTERPRET else "cuda"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: large shapes, run on a CUDA GPU only (skipped elsewhere)")


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and (kernels.INTERPRET or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU without TRITON_INTERPRET")


@pytest.fixture
def device():
    return DEVICE

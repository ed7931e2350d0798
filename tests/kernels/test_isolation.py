"""The interpreter switch stays inside this folder (tests elsewhere must not see the Triton backend offered)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the interpreter is never switched on")
def test_triton_interpret_does_not_leak_into_other_test_folders(tmp_path):
    """Collect this folder first and a probe outside it: the probe sees no TRITON_INTERPRET, kernels interpreted."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os, sys\n"
                     "def test_probe():\n"
                     "    assert 'TRITON_INTERPRET' not in os.environ\n"
                     "    assert sys.modules['kernels'].INTERPRET\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/kernels/test_patch.py::test_patch_refuses_a_model_without_ops", str(probe),
                           "--rootdir", str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout

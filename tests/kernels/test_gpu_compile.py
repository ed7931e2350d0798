"""Every kernel compiles for an H100/H200 (sm_90) without a GPU, within Hopper's shared memory per block: what the
interpreter cannot check."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED_LIMIT = 232448  # 227 KB, an sm_90 block's most; kernels.utils.SHARED_MEMORY_BYTES must say the same
LINE = re.compile(r"^(ok  |FAIL) (\w+) \[(\w+) D=(\d+)\] .* shared (\d+) B", re.M)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is here: the tests run the real compiled kernels")


def compile_for_gpu(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(Path(__file__).with_name("compile_for_gpu.py")), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def test_every_kernel_compiles_for_sm90():
    done = compile_for_gpu("--quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("ok   ") >= 15, done.stdout


def test_attention_and_decode_fit_shared_memory_for_fp32_and_bf16_up_to_head_dim_256():
    """The configs the pickers choose (attention_config, decode_config) for fp32 and bf16 at head dims 64, 128,
    256 build within 227 KB of shared memory each (fp32 decode at D=256 took ~276 KB with 64-key tiles)."""
    from kernels.utils import SHARED_MEMORY_BYTES

    assert SHARED_MEMORY_BYTES == SHARED_LIMIT
    done = compile_for_gpu("--wide")
    built = {(m[2], m[3], int(m[4])): (m[1], int(m[5])) for m in LINE.finditer(done.stdout)}
    kernels = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_decode_partial_kernel"}
    expected = {(k, dtype, D) for k in kernels for dtype in ("fp32", "bf16") for D in (64, 128, 256)}
    expected |= {("_decode_combine_kernel", "bf16", D) for D in (64, 128, 256)}   # reads fp32 partials either way
    assert set(built) == expected, done.stdout[-3000:] + done.stderr[-3000:]
    over = {key: shared for key, (_, shared) in built.items() if shared > SHARED_LIMIT}
    assert not over, over
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

"""kernels/gpu_run.sh, the one command a lent GPU machine runs: valid bash, python3 only (the lent image has no
`python`), a hard timeout on every step, and a dry run here (no CUDA) that says what it skipped and leaves at most
8 files in $OUT (all that comes back from such a machine)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "kernels" / "gpu_run.sh"
FILES = {"summary.txt", "tests.xml", "run.log", "probe.json", "bench.csv", "rest.tar.gz"}


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_gpu_run_script_is_valid_bash_and_runs_python3_only():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    lines = code_lines(SCRIPT.read_text())
    bare = [line for line in lines if re.search(r"(^|[\s=\"(:-])python(?![\w.3'])", line)]
    assert not bare, bare                                            # `python` alone: absent on the lent image
    assert 'PY=python3' in lines
    assert not [line for line in lines if re.search(r"pip install|apt-get", line)]   # installs nothing
    steps = [line for line in lines if re.match(r"\s*step \w+ \d+ ", line)]
    assert len(steps) >= 5 and all(int(line.split()[2]) <= 170 for line in steps), steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU gpu_run.sh runs for real, not as this dry run")
def test_gpu_run_dry_run_says_what_it_skipped_and_leaves_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    # python3 must be this interpreter (the venv's), as it is the image's on the lent machine
    env.update(OUT=str(out), GPU_RUN_DRY="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files == FILES and len(files) <= 8, files
    summary = (out / "summary.txt").read_text()
    for name in ("kernel_tests", "compiled_triton", "sanitizer", "benchmark"):
        assert re.search(rf"^{name}\s+SKIPPED: GPU_RUN_DRY=1", summary, re.M), summary
    assert "skipped steps:" in summary and "no tests run" in summary
    assert re.search(r"^probe end_to_end\s+skipped", summary, re.M), summary
    assert (out / "bench.csv").read_text().startswith("op,provider,mode")
    from kernels.bench import HEADER
    assert (out / "bench.csv").read_text().strip() == ",".join(HEADER)

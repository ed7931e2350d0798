"""`--strategy fsdp` (backend/training/fsdp.py): 2 CPU processes on gloo under torchrun, the model sharded with
FSDP2's `fully_shard`, give the loss curve of one process on the same global batch (within 1e-4), validate and
sample on rank 0's gathered copy, save a checkpoint and resume it to the same losses, and save the same model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backend
from backend.errors import TrainError
from backend.training import TrainConfig, list_checkpoints, train
from tests.backend.train_util import make_base, quick, write_text

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = dict(mode="full", steps=STEPS, lr=1e-3, grad_accum=2, warmup_steps=2, seq_len=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    base = make_base(root / "base")
    data = write_text(root / "corpus.txt", 8000)
    one = train(quick(data, root / "one", model=str(base), batch_size=4, eval_every=3, **COMMON))  # 1 x 4 x 2
    return root, base, data, one


def torchrun(data: Path, base: Path, out: Path, *extra: str) -> dict:
    """2 processes x 2 sequences x 2 micro-batches: the same global batch of 8 as the one-process run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "backend",
           "finetune", "--strategy", "fsdp", "--data", str(data), "--out", str(out), "--model", str(base),
           "--mode", "full", "--steps", str(STEPS), "--lr", "1e-3", "--grad-accum", "2", "--warmup-steps", "2",
           "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--sample-every", str(STEPS),
           "--sample-tokens", "4", "--save-every", "3", "--device", "cpu", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stderr
    return json.loads((out / "training.json").read_text())


@pytest.fixture(scope="module")
def two(setup):
    root, base, data, _ = setup
    return torchrun(data, base, root / "two")


def losses(state: dict) -> list[float]:
    return [loss for _, loss in state["train_loss"]]


def test_fsdp_two_processes_match_one_process(setup, two):
    root, *_, one = setup
    a, b = losses(one), losses(two)
    assert len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    assert a[-1] < a[0]
    # validation on rank 0's gathered copy: the same numbers as the one-process run
    assert [s for s, *_ in two["val_loss"]] == [0, 3, 6]
    assert two["val_loss"][-1][1] == pytest.approx(one["val_loss"][-1][1], abs=1e-4)
    assert two["samples"] and two["samples"][-1]["step"] == STEPS and two["samples"][-1]["text"]
    # the saved model is the one-process model
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    diff = backend.load(root / "two").logits(ids) - backend.load(root / "one").logits(ids)
    assert diff.abs().max().item() <= 1e-4


DRIVER = """
import json, os, sys
from backend.training import TrainConfig, train

cfg, stop_after = TrainConfig.from_dict(json.loads(sys.argv[1])), int(sys.argv[2])
asked = [0]

def should_stop():  # asked on rank 0 before every step: Stop after `stop_after` steps (a checkpoint is saved)
    asked[0] += 1
    return asked[0] > stop_after

state = train(cfg, should_stop=should_stop)
if os.environ["RANK"] == "0":  # (both ranks return the state; rank 0's is the one reported)
    with open(sys.argv[3], "w") as f:
        json.dump({"status": state["status"], "train_loss": state["train_loss"]}, f)
"""


def test_fsdp_checkpoint_resumes_to_the_same_losses(setup, two, tmp_path):
    """Stopped after 3 steps on 2 FSDP processes (checkpoint-000003: whole weights and optimizer state), then
    resumed on 2 processes to the end: the same 6 losses as the uninterrupted run."""
    root, base, data, _ = setup
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cfg = quick(data, tmp_path / "out", model=str(base), batch_size=2, strategy="fsdp", **COMMON).to_dict()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def run(stop_after: int, resume: bool) -> dict:
        report = tmp_path / f"report-{stop_after}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
               json.dumps({**cfg, "resume": resume}), str(stop_after), str(report)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(report.read_text())

    stopped = run(3, resume=False)
    assert stopped["status"] == "cancelled" and len(stopped["train_loss"]) == 3
    (step, folder), = list_checkpoints(tmp_path / "out")
    assert step == 3 and (folder / "weights.safetensors").exists()
    resumed = run(STEPS, resume=True)
    assert resumed["status"] == "done"
    assert max(abs(x - y) for x, y in zip(losses(two), losses(resumed))) <= 1e-5, (losses(two), losses(resumed))
    assert len(losses(resumed)) == STEPS


def test_fsdp_refuses_lora_plainly(tmp_path):
    from backend.models import family
    from backend.training.fsdp import check_fsdp

    cfg = TrainConfig(data="x", out="y", mode="lora", strategy="fsdp").check()
    with pytest.raises(TrainError, match="LoRA"):
        check_fsdp(cfg, family("llama"))
    with pytest.raises(TrainError, match="strategy must be one of ddp, fsdp"):
        TrainConfig(data="x", out="y", strategy="zero3").check()

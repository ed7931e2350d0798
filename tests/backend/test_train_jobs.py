"""Training in real subprocesses: the JobManager (start, state, one job at a time, cancel, reattach, a dead process)
and a 2-process gloo DDP run under torchrun whose losses match one process on the same global batch."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backend
from backend.errors import TrainError
from backend.training import JobManager, list_checkpoints, train
from tests.backend.train_util import make_base, quick, write_text

REPO = Path(__file__).resolve().parents[2]
STATE_KEYS = {"id", "status", "step", "total_steps", "tokens_per_s", "train_loss", "val_loss", "samples", "metrics",
              "error", "out_dir", "config", "started", "updated"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "tiny-llama")


def _wait_for(jm, job_id, ok, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = jm.state(job_id)
        if ok(state):
            return state
        assert state["status"] in ("starting", "running"), (state, jm.log(job_id))
        time.sleep(0.1)
    raise AssertionError(f"timed out: {jm.state(job_id)}\n{jm.log(job_id)}")


def test_job_manager_start_state_cancel_latest(base, tmp_path):
    root = tmp_path / "jobs"
    jm = JobManager(root)
    assert jm.latest() is None and jm.jobs() == []
    data = write_text(tmp_path / "corpus.txt", 8000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{oops\n')
    with pytest.raises(TrainError, match="line 2 is not valid JSON"):  # bad data fails at once, no process
        jm.start(quick(bad, tmp_path / "x", mode="full", model=str(base)))
    long_out = tmp_path / "long"
    job = jm.start(quick(data, long_out, mode="full", model=str(base), steps=100_000))
    assert jm.latest() == job and jm.jobs() == [job]
    state = _wait_for(jm, job, lambda s: s["step"] >= 3)
    assert state["status"] == "running" and STATE_KEYS <= set(state) and state["total_steps"] == 100_000
    assert state["train_loss"][0][0] == 1 and state["tokens_per_s"] > 0 and state["out_dir"] == str(long_out)
    with pytest.raises(TrainError, match=f"job {job} is still running.*one training job runs at a time"):
        jm.start(quick(data, tmp_path / "other", mode="full", model=str(base)))

    jm.cancel(job)
    state = jm.wait(job, timeout=60)
    assert state["status"] == "cancelled" and state["error"] is None
    assert [s for s, _ in list_checkpoints(long_out)] == [state["step"]]

    again = JobManager(root)  # a fresh manager, as after a page reload or a UI restart, finds the job again
    assert again.latest() == job and again.state(job)["status"] == "cancelled"
    short_out = tmp_path / "short"
    job2 = again.start(quick(data, short_out, mode="full", model=str(base), steps=4, eval_every=2, sample_every=4,
                             sample_prompts=["The"]))
    state = again.wait(job2, timeout=90)
    assert state["status"] == "done", again.log(job2)
    assert [v[0] for v in state["val_loss"]] == [0, 2, 4] and [s["step"] for s in state["samples"]] == [0, 4]
    assert [s for s, _ in state["train_loss"]] == [1, 2, 3, 4] and state["config"]["task"] == "lm"
    assert again.jobs() == [job, job2] and again.latest() == job2
    assert backend.load(short_out).generate("The", max_new_tokens=3, temperature=0).completions[0].tokens


def test_job_whose_process_died_or_failed_is_reported_failed(base, tmp_path):
    jm = JobManager(tmp_path / "jobs")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    job_dir = tmp_path / "jobs" / "20200101-000000-dead"
    job_dir.mkdir()
    (job_dir / "state.json").write_text(json.dumps({"id": job_dir.name, "status": "running", "pid": gone.pid,
                                                     "started": 1.0, "step": 7, "out_dir": "x"}))
    (job_dir / "log.txt").write_text("step 7\nKilled\n")
    state = jm.state(job_dir.name)
    assert state["status"] == "failed" and "exited" in state["error"] and "Killed" in state["error"]
    with pytest.raises(TrainError, match="no training job"):
        jm.state("nope")

    # an error only the training process can see (the model's context) ends up in the state
    data = write_text(tmp_path / "corpus.txt", 4000)
    job = jm.start(quick(data, tmp_path / "out", mode="full", model=str(base), seq_len=1000))
    state = jm.wait(job, timeout=60)
    assert state["status"] == "failed" and "beyond the model's context of 128" in state["error"]
    assert not (tmp_path / "out").exists()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """Pretraining (rank 0 trains the tokenizer and sends it to rank 1) with gradient accumulation, the same global
    batch of 8 sequences per step: one process x 4 x 2 micro-batches, or two processes x 2 x 2."""
    data = write_text(tmp_path / "corpus.txt", 8000)
    kw = dict(mode="pretrain", vocab_size=320, steps=6, lr=3e-3, grad_accum=2, warmup_steps=2)
    one = train(quick(data, tmp_path / "one", batch_size=4, **kw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "backend",
           "finetune", "--data", str(data), "--out", str(tmp_path / "two"), "--mode", "pretrain", "--vocab-size", "320",
           "--steps", "6", "--lr", "3e-3", "--grad-accum", "2", "--warmup-steps", "2", "--batch-size", "2",
           "--seq-len", "32", "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    two = json.loads((tmp_path / "two" / "training.json").read_text())
    assert (tmp_path / "one" / "tokenizer.json").read_text() == (tmp_path / "two" / "tokenizer.json").read_text()
    a = [loss for _, loss in one["train_loss"]]
    b = [loss for _, loss in two["train_loss"]]
    assert len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert a[-1] < a[0]

"""Disk and training caps (issue 18, item 10 and the training items): finetunes count against the cache cap and go
oldest first, but never the files of a job still running (whoever's it is); the compile caches and chat exports
live in capped areas; a job past its wall-clock limit is stopped; a job's sequence length, validation passes and
sample prompts are capped in public mode."""
import json
import os
import subprocess
import sys
import time

import pytest

from backend.disk import caches as cache_dir
from backend import limits
from backend.training import TrainConfig
from backend.training import jobs as jobs_module
from backend.training.jobs import JobManager


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache_dir.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))  # not the shared /tmp
    return tmp_path / "cache"


def entry(folder, name, n_bytes, age_s):
    path = folder / name
    path.mkdir(parents=True)
    (path / "blob").write_bytes(b"\0" * n_bytes)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def job_state(cache, job_id, status, data, out_dir):
    job_dir = cache / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "state.json").write_text(json.dumps(dict(id=job_id, status=status, out_dir=str(out_dir),
                                                        config={"data": str(data)}, started=time.time())))


def test_finished_finetunes_are_evicted_oldest_first_but_a_running_jobs_files_never(cache):
    areas = cache_dir.areas()
    oldest = entry(areas["finetuned"], "full-1", 1000, 500)
    running_out = entry(areas["finetuned"], "full-2", 1000, 400)   # another visitor's job, still training
    running_data = areas["uploads"] / "their-data.txt"
    running_data.parent.mkdir(parents=True)
    running_data.write_bytes(b"x" * 1000)
    os.utime(running_data, (time.time() - 450,) * 2)
    newer = entry(areas["finetuned"], "lora-3", 1000, 100)
    job_state(cache, "j-running", "running", running_data, running_out)
    job_state(cache, "j-done", "done", running_data.parent / "gone.txt", oldest)
    removed = cache_dir.evict(3000)
    assert [e.path for e in removed] == [oldest]
    assert running_out.exists() and running_data.exists() and newer.exists()
    assert {e.path for e in cache_dir.evict(0)} == {newer}  # with no room at all, only the busy files stay
    assert running_out.exists() and running_data.exists()


def test_a_local_users_finetunes_are_results_not_cache(cache, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    kept = entry(cache / "finetuned", "full-1", 1000, 500)
    assert cache_dir.evict(0) == [] and kept.exists()


def test_compile_caches_live_in_the_capped_cache(cache, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cache_dir.use_capped_compiler_caches()
    inductor = cache_dir.areas()["inductor"]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(inductor)
    assert os.environ["TRITON_CACHE_DIR"] == str(cache_dir.areas()["triton"])
    graphs = entry(inductor, "fxgraph", 5000, 100)
    assert [e.path for e in cache_dir.evict(1000)] == [graphs]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/operator/choice")  # the operator's folder wins
    cache_dir.use_capped_compiler_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/operator/choice"


def test_chat_exports_are_kept_few_and_briefly(cache, monkeypatch):
    from playground.tabs import chat_files

    monkeypatch.setattr(chat_files, "MAX_CHAT_EXPORTS", 20)
    old = entry(cache_dir.areas()["chats"], "chat-old", 10, chat_files.CHAT_EXPORT_TTL_S + 60)
    paths = [chat_files.write("{}", "chat.json") for _ in range(chat_files.MAX_CHAT_EXPORTS + 20)]
    folders = list(cache_dir.areas()["chats"].iterdir())
    assert not old.exists() and len(folders) == chat_files.MAX_CHAT_EXPORTS
    assert os.path.exists(paths[-1]) and not os.path.exists(paths[0])


@pytest.mark.parametrize("option, words", [
    (dict(seq_len=4096), "seq_len is 4,096 but this public deployment allows at most 1,024"),
    (dict(steps=2000, eval_every=1), "the number of validation passes (steps / eval_every) is 2,000"),
    (dict(sample_prompts=["a prompt"] * 9), "the number of sample prompts is 9"),
    (dict(sample_prompts=["x" * 501]), "a sample prompt's length in characters is 501"),
])
def test_a_jobs_work_is_capped_in_public_mode(cache, monkeypatch, option, words):
    cfg = TrainConfig(data="d.txt", out="o", **option)
    with pytest.raises(limits.LimitError) as e:
        cfg.check()
    assert words in str(e.value)
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    cfg.check()  # a local user's run


def test_a_job_past_its_wall_clock_limit_is_stopped(cache, tmp_path, monkeypatch):
    """A 'training process' that never ends a step (it only sleeps): at the limit it is asked to stop (the cancel
    file: a checkpoint at its next step), KILL_GRACE_S later killed; the state says why."""
    real_popen = subprocess.Popen
    monkeypatch.setattr(jobs_module.subprocess, "Popen", lambda args, **kw: real_popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *args[-2:]], **kw))
    monkeypatch.setenv("FORNAX_MAX_TRAIN_SECONDS", "1")
    monkeypatch.setattr(jobs_module, "KILL_GRACE_S", 1.0)
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    manager = JobManager(cache / "jobs")
    job = manager.start(TrainConfig(data=str(data), mode="pretrain", steps=10, batch_size=2, seq_len=32),
                        upload=str(data), server_paths=False)
    job_dir = manager.job_dir(job)
    started = time.monotonic()
    state = manager.wait(job, timeout=30)
    assert (job_dir / "cancel").exists() and (job_dir / jobs_module.TIME_UP_FILE).exists()
    assert state["status"] == "cancelled" and "limit of 1 s per training job" in state["message"], state
    assert time.monotonic() - started < 30 and manager._procs == {}


def test_a_poll_while_a_second_cancel_kills_the_job_sees_it_cancelled_not_failed(cache, tmp_path, monkeypatch):
    """The kill and the 'cancelled' state are two steps: a page polling between them (here: at the moment the
    state is written) must not be told the job failed."""
    real_popen = subprocess.Popen
    monkeypatch.setattr(jobs_module.subprocess, "Popen", lambda args, **kw: real_popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *args[-2:]], **kw))
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    manager = JobManager(cache / "jobs")
    job = manager.start(TrainConfig(data=str(data), mode="pretrain", steps=10, batch_size=2, seq_len=32),
                        upload=str(data), server_paths=False)
    polled = []
    real_write = jobs_module.write_json_atomic

    def write_then_poll(path, value):
        if value.get("status") == "cancelled":
            polled.append(manager.state(job)["status"])  # the process is dead, its state not yet written
        real_write(path, value)
    monkeypatch.setattr(jobs_module, "write_json_atomic", write_then_poll)
    manager.cancel(job)  # (a process that has not said its pid yet gets the cancel file only)
    manager.cancel(job)  # still active: killed
    assert polled == ["cancelled"]
    assert manager.state(job)["status"] == "cancelled"

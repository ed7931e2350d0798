"""JobManager's policy, shared by the command line and the playground: upload copies (checked first), the output
folder, the sample cadence, path rules of a public deployment, which job resumes, and who may control a job."""
import time

import pytest

from backend.errors import TrainError
from backend.training import JobManager
from tests.backend.train_util import quick, write_text


def test_an_upload_is_checked_then_kept_and_the_job_paced_and_named(tmp_path):
    jm = JobManager(tmp_path / "jobs")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(TrainError, match="line 2"):
        jm.start(quick("", "", mode="pretrain"), upload=bad, server_paths=False)
    assert not (tmp_path / "train-data").exists()  # refused before anything was copied
    data = write_text(tmp_path / "corpus.txt", 8000)
    job = jm.start(quick("", "", mode="pretrain", steps=40, vocab_size=300), upload=data, server_paths=False,
                   paced=True, owner="session-a")
    cfg = jm.state(job)["config"]
    jm.cancel(job, owner="session-a")
    jm.wait(job, timeout=60)
    kept = tmp_path / "train-data"
    assert cfg["data"].startswith(str(kept)) and open(cfg["data"]).read() == data.read_text()
    assert cfg["out"].startswith(str(tmp_path / "finetuned" / "pretrain-"))
    assert (cfg["sample_every"], cfg["save_every"]) == (10, 20)


def test_a_public_deployment_refuses_server_paths(tmp_path):
    jm = JobManager(tmp_path / "jobs")
    data = write_text(tmp_path / "corpus.txt", 8000)
    with pytest.raises(TrainError, match="upload only"):
        jm.start(quick(data, "", mode="pretrain"), server_paths=False)
    with pytest.raises(TrainError, match="chooses the output folder itself"):
        jm.start(quick("", tmp_path / "out", mode="pretrain"), upload=data, server_paths=False)
    assert jm.jobs() == []


def test_only_the_owner_sees_cancels_and_resumes_a_job(tmp_path):
    jm = JobManager(tmp_path / "jobs")
    data = write_text(tmp_path / "corpus.txt", 8000)
    job = jm.start(quick(data, tmp_path / "out", mode="pretrain", steps=100_000, vocab_size=300), owner="a")
    assert jm.latest("a") == job and jm.latest("b") is None and jm.latest() == job
    assert jm.may_control(job, "a") and not jm.may_control(job, "b") and jm.may_control(job, None)
    with pytest.raises(TrainError, match="started by someone else"):
        jm.cancel(job, owner="b")
    with pytest.raises(TrainError) as e:  # b is told a job runs, not where it writes
        jm.start(quick(data, tmp_path / "out2", mode="pretrain"), owner="b")
    assert "one training job runs at a time" in str(e.value) and str(tmp_path / "out") not in str(e.value)
    with pytest.raises(TrainError, match="still"):
        jm.resume(job, owner="a")
    while jm.state(job)["step"] < 2 and jm.state(job)["status"] in ("starting", "running"):
        time.sleep(0.1)  # a few steps: a checkpoint to resume from
    jm.cancel(job, owner="a")
    assert jm.wait(job, timeout=60)["status"] == "cancelled"
    with pytest.raises(TrainError, match="started by someone else"):
        jm.resume(job, owner="b")
    with pytest.raises(TrainError, match="no training job to resume"):
        jm.resume(owner="b")
    again = jm.resume(owner="a")  # the newest checkpoint of a's latest job
    assert jm.state(again)["config"]["resume"] is True and jm.latest("a") == again and jm.latest("b") is None
    jm.cancel(again, owner="a")
    jm.wait(again, timeout=60)

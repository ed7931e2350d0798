"""JobManager: each training run is a subprocess with persisted state, so a UI can start one, poll it, find it again
after a page reload (or a restart of the UI), and cancel it. One job runs at a time.

    ROOT/<job id>/
        config.json   the TrainConfig
        state.json    the live state, written atomically by the training process (keys below)
        pid           the training process id
        owner         (optional) a hash of who started it: only they see its details, cancel or resume it
        log.txt       its standard output and error
        cancel        made by cancel(): the loop stops at the next step, saves a checkpoint, status 'cancelled'
        time-up       made when the job ran past `limits.max_train_seconds`: then cancelled (with a checkpoint)

state.json: id, status ('starting' | 'running' | 'done' | 'failed' | 'cancelled'), step, total_steps, tokens_per_s,
train_loss [[step, loss]], val_loss [[step, loss, perplexity]], samples [{step, prompt, text}] (step 0 = before
training), metrics (classify: accuracy, macro_f1, majority_baseline, n, step, method = 'label words' for
a causal model or 'classification head' for an encoder; encoder pretraining: masked_accuracy [, nsp_accuracy,
nsp_pairs]), error (str | None), out_dir, config,
started, updated (unix times); also message (what it is doing now), lr, data (a summary), pid.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .. import budget, limits
from ..disk import caches as cache_dir
from ..errors import TrainError
from .checkpoint import write_json_atomic
from .config import TrainConfig
from ..data.records import read_records
from .progress import CANCEL_FILE, STATE_FILE
from .setup import check_out_folder

ACTIVE = ("starting", "running")
SAMPLES_PER_JOB, CHECKPOINTS_PER_JOB = 4, 2  # `paced`: a job of any length samples 4 times, checkpoints twice
OWNER_FILE = "owner"                         # a hash of who started the job (see `start(owner=...)`)
TIME_UP_FILE = "time-up"                     # the job ran past its wall-clock limit and was stopped
KILL_GRACE_S = 60.0                          # past the limit by this much still active: killed
KILLED = dict(status="cancelled", message="killed by a second cancel (no checkpoint of this step)")
REPO = Path(__file__).resolve().parents[2]  # the folder that holds the `backend` package

__all__ = ["JobManager", "TrainConfig", "TrainError", "mark_failed"]


class JobManager:
    def __init__(self, root: str | os.PathLike, uploads: str | os.PathLike | None = None,
                 outputs: str | os.PathLike | None = None):
        """Jobs live under `root`; kept copies of uploaded data under `uploads` and the models of jobs started
        without an output folder under `outputs` (default: `train-data` and `finetuned` beside `root`)."""
        self.root = Path(root).expanduser().absolute()  # the training process runs in another folder
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads = Path(uploads).expanduser().absolute() if uploads else self.root.parent / "train-data"
        self.outputs = Path(outputs).expanduser().absolute() if outputs else self.root.parent / "finetuned"
        self._procs: dict[str, subprocess.Popen] = {}  # children of this process (polled, so none stays a zombie)
        self._stopping: set[str] = set()  # jobs whose wall-clock stop is being sent now
        self._killing: set[str] = set()   # jobs a second cancel is killing: dead before their state says cancelled
        self._lock = threading.Lock()

    @contextmanager
    def _starting(self):
        """Check-then-spawn as one step, across threads (a double click) and processes (two app instances)."""
        with self._lock, open(self.root / ".start.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def start(self, cfg: TrainConfig, *, upload: str | os.PathLike | None = None, server_paths: bool = True,
              paced: bool = False, owner: str | None = None) -> str:
        """Check the config, the data file and the output folder, then run `python -m backend finetune` in a
        subprocess; returns the job id. Raises TrainError for bad input or while another job is running.

        The policy every front end shares:
        - `upload`: a file handed over by a browser (which its server deletes later): trained on instead of
          `cfg.data`; checked first, then copied under `self.uploads`, so the job and a later resume keep it.
        - `server_paths=False` (a public deployment): the data must be an upload and the output folder is chosen
          here, so a visitor can neither read nor write a path on this machine.
        - an empty `cfg.out`: a new folder `<mode>-<time>-<random>` under `self.outputs`.
        - `paced`: samples SAMPLES_PER_JOB times and checkpoints CHECKPOINTS_PER_JOB times whatever `steps` is.
        - `owner` (e.g. a browser session): only the same owner may see the job's details, cancel or resume it;
          None = anyone."""
        cfg = TrainConfig.from_dict(cfg.to_dict())
        if upload:
            cfg.data = str(upload)
        elif not server_paths:
            raise TrainError("this deployment takes training data as an upload only")
        if not cfg.data:
            raise TrainError("choose training data: upload a .txt, .jsonl or .csv file, or give its path")
        if cfg.out and not server_paths:
            raise TrainError("this deployment chooses the output folder itself: leave it empty")
        cfg.out = cfg.out or str(self.outputs / f"{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
        if paced:
            cfg.sample_every = max(1, cfg.steps // SAMPLES_PER_JOB)
            cfg.save_every = max(1, cfg.steps // CHECKPOINTS_PER_JOB)
        cfg.check()
        check_job_memory(cfg)
        records = read_records(cfg.data, cfg.task)  # a malformed file fails now, not in the background
        cfg.task = records.task
        if upload:  # only data that passed the check is copied
            cfg.data = self._keep(Path(upload))
            cache_dir.evict(keep=(cfg.data,))  # older uploads and finished finetunes go past the disk cap
        cfg.data = str(Path(cfg.data).expanduser().resolve())
        cfg.out = str(Path(cfg.out).expanduser().resolve())
        if cfg.model != "default" and Path(cfg.model).expanduser().exists():  # (the process runs in another folder)
            cfg.model = str(Path(cfg.model).expanduser().resolve())
        with self._starting():
            for job in self.jobs():
                try:
                    st = self.state(job)
                except TrainError:  # an unreadable state (a crash mid-write long ago) does not block new jobs
                    continue
                if st["status"] in ACTIVE:
                    where = f" (training into {st['out_dir']})" if self.may_control(job, owner) else ""
                    raise TrainError(f"job {job} is still {st['status']}{where}; one training job runs at a time: "
                                     f"wait for it or cancel it")
            check_out_folder(Path(cfg.out), cfg)
            return self._spawn(cfg, owner)

    def resume(self, job_id: str | None = None, *, owner: str | None = None) -> str:
        """Continue `job_id` (default: the latest job of `owner`) from its newest checkpoint, as a new job with the
        same settings and data (the training loop checks both); returns the new job's id."""
        job_id = job_id or self.latest(owner)
        if job_id is None:
            raise TrainError("no training job to resume")
        self._check_owner(job_id, owner, "resume")
        state = self.state(job_id)
        if state["status"] in ACTIVE:
            raise TrainError(f"job {job_id} is still {state['status']}")
        if state["status"] == "done":
            raise TrainError(f"job {job_id} has finished: there is nothing to resume")
        if not any(Path(state["out_dir"]).glob("checkpoint-*")):
            raise TrainError(f"job {job_id} saved no checkpoint before it ended: start it again instead")
        return self.start(TrainConfig.from_dict({**state["config"], "resume": True}), owner=owner)

    def _keep(self, upload: Path) -> str:
        dest = self.uploads / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}-{upload.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(upload, dest)
        return str(dest)

    # --- who may see and control a job ---
    def may_control(self, job_id: str, owner: str | None) -> bool:
        """Whether `owner` may see the job's details, cancel or resume it: always without owners on either side."""
        try:
            recorded = (self.job_dir(job_id) / OWNER_FILE).read_text()
        except OSError:
            return True
        return owner is None or recorded == _owner_hash(owner)

    def _check_owner(self, job_id: str, owner: str | None, verb: str) -> None:
        if not self.may_control(job_id, owner):
            raise TrainError(f"job {job_id} was started by someone else: only they can {verb} it")

    def _spawn(self, cfg: TrainConfig, owner: str | None) -> str:
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        job_dir = self.root / job_id
        job_dir.mkdir()
        if owner is not None:
            (job_dir / OWNER_FILE).write_text(_owner_hash(owner))
        write_json_atomic(job_dir / "config.json", cfg.to_dict())
        now = time.time()
        write_json_atomic(job_dir / STATE_FILE, dict(
            id=job_id, status="starting", step=0, total_steps=cfg.steps, tokens_per_s=0.0, train_loss=[], val_loss=[],
            samples=[], metrics={}, error=None, out_dir=cfg.out, config=cfg.to_dict(), started=now, updated=now,
            pid=None, message="starting the training process"))
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if owner is not None:  # the result's history row belongs to who started it (backend/scoring/history.py)
            env["FORNAX_HISTORY_VISITOR"] = hashlib.sha256(owner.encode()).hexdigest()[:32]
        with open(job_dir / "log.txt", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backend", "finetune", "--config", str(job_dir / "config.json"),
                 "--job-dir", str(job_dir)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=str(REPO), start_new_session=True)  # its own session: a Ctrl-C in the UI's terminal
        (job_dir / "pid").write_text(str(proc.pid))             # does not kill the run
        self._procs[job_id] = proc
        seconds = limits.current().max_train_seconds
        if seconds > 0:
            timer = threading.Timer(seconds, self._time_up, (job_id,))
            timer.daemon = True
            timer.start()
        return job_id

    def _time_up(self, job_id: str) -> None:
        """The job's wall-clock limit has passed: stop it like a cancel (a checkpoint, then 'cancelled'); still
        active KILL_GRACE_S later (a step that never ends), killed."""
        with self._lock:
            if job_id in self._stopping:
                return
            self._stopping.add(job_id)
        try:
            job_dir = self.job_dir(job_id)
            if _read_state(job_dir)["status"] not in ACTIVE:
                return
            first = not (job_dir / TIME_UP_FILE).exists()
            (job_dir / TIME_UP_FILE).touch()
            if first:
                (job_dir / CANCEL_FILE).unlink(missing_ok=True)  # a cancel, not the kill of a second cancel
            self.cancel(job_id)
            if first:
                timer = threading.Timer(KILL_GRACE_S, self._time_up, (job_id,))
                timer.daemon = True
                timer.start()
        except TrainError:
            pass
        finally:
            self._stopping.discard(job_id)

    def _over_time(self, job_id: str, state: dict) -> bool:
        """An active job past its wall-clock limit (its timer may have died with an earlier app process)."""
        seconds = limits.current().max_train_seconds
        started = state.get("started") or time.time()
        grace = KILL_GRACE_S if (self.root / job_id / TIME_UP_FILE).exists() else 0.0
        return seconds > 0 and time.time() - started > seconds + grace

    def state(self, job_id: str) -> dict:
        """The job's state.json; an active job whose process has died is reported 'failed' with its log's tail."""
        job_dir = self.job_dir(job_id)
        proc = self._procs.get(job_id)
        running = proc is not None and proc.poll() is None  # (polling also reaps a finished child)
        state = _read_state(job_dir)
        if state["status"] not in ACTIVE:
            if proc is not None and not running:
                del self._procs[job_id]  # reaped: the table holds live children only
            return _said_time_up(job_dir, state)
        pid = state.get("pid") or _read_pid(job_dir)
        if proc is not None:
            alive, code = running, proc.returncode
        else:
            alive, code = pid is not None and _pid_alive(pid, str(job_dir)), None
        if alive:
            if job_id not in self._stopping and self._over_time(job_id, state):  # (also an earlier process's job)
                threading.Thread(target=self._time_up, args=(job_id,), daemon=True).start()
            return state
        state = _read_state(job_dir)  # it may have written its final status just before exiting
        if state["status"] in ACTIVE and job_id in self._killing:  # cancel() is writing this very state now
            return _said_time_up(job_dir, {**state, **KILLED})
        if state["status"] in ACTIVE:
            how = f" with exit code {code}" if code is not None else ""
            tail = _log_tail(job_dir)
            state.update(status="failed", message="failed",
                         error=f"the training process exited{how} without a final status (killed, or out of "
                               f"memory?)" + (f"; the end of its log:\n{tail}" if tail else ""))
        return state

    def jobs(self) -> list[str]:
        """Every job id under root, oldest first."""
        found = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            if (d / STATE_FILE).is_file():
                try:
                    started = json.loads((d / STATE_FILE).read_text()).get("started", 0)
                except (OSError, ValueError):
                    started = 0
                found.append((started, d.name))
        return [name for _, name in sorted(found)]

    def latest(self, owner: str | None = None) -> str | None:
        """The most recently started job `owner` may control (for a UI to reattach to after a reload), or None."""
        jobs = [job for job in self.jobs() if self.may_control(job, owner)]
        return jobs[-1] if jobs else None

    def cancel(self, job_id: str, owner: str | None = None) -> dict:
        """Ask the job to stop: at its next step it saves a checkpoint and ends with status 'cancelled'. Asked again
        while it is still active (stuck loading a model, say), the process is killed and the job marked cancelled."""
        self._check_owner(job_id, owner, "cancel")
        job_dir = self.job_dir(job_id)
        again = (job_dir / CANCEL_FILE).exists()
        (job_dir / CANCEL_FILE).touch()
        state = self.state(job_id)
        # The process writes its pid into the state once its SIGTERM handler (= cancel at the next step, with a
        # checkpoint) is in place; before that a SIGTERM would just kill it, so the cancel file alone must do.
        pid = state.get("pid") if not again else (state.get("pid") or _read_pid(job_dir))
        if state["status"] in ACTIVE and pid and _pid_alive(pid, str(job_dir)):
            if again:  # a poll between the kill and the state written below must not call the job failed
                self._killing.add(job_id)
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL if again else signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            if again:  # stuck (a model load that hangs, say): killed, and said so
                try:
                    proc = self._procs.get(job_id)
                    if proc is not None:
                        proc.wait(timeout=10)  # reap it
                    state.update(**KILLED, updated=time.time())
                    write_json_atomic(job_dir / STATE_FILE, state)
                finally:
                    self._killing.discard(job_id)
        return state

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.2) -> dict:
        """Block until the job is no longer active (or timeout seconds pass); returns its state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state["status"] not in ACTIVE or (deadline is not None and time.monotonic() > deadline):
                return state
            time.sleep(poll)

    def log(self, job_id: str, max_chars: int = 20000) -> str:
        """The end of the job's log (stdout and stderr of the training process)."""
        return _log_tail(self.job_dir(job_id), max_chars)

    def job_dir(self, job_id: str) -> Path:
        """The folder of an existing job (its state, log, kept upload)."""
        job_dir = self.root / str(job_id)
        if not job_id or "/" in str(job_id) or not (job_dir / STATE_FILE).is_file():
            raise TrainError(f"no training job {job_id!r} in {self.root}")
        return job_dir


def mark_failed(job_dir: Path, message: str) -> None:
    """Record a failure that happened before the training loop could report it (e.g. a bad --config)."""
    job_dir = Path(job_dir)
    state = _read_state(job_dir) if (job_dir / STATE_FILE).exists() else {"id": job_dir.name}
    state.update(status="failed", error=message, message="failed", updated=time.time(), pid=os.getpid())
    write_json_atomic(job_dir / STATE_FILE, state)


def _said_time_up(job_dir: Path, state: dict) -> dict:
    """An ended job stopped by its wall-clock limit says so."""
    if state["status"] == "cancelled" and (job_dir / TIME_UP_FILE).exists():
        seconds = limits.current().max_train_seconds
        state = {**state, "message": f"stopped at this deployment's limit of {seconds:,.0f} s per training job: "
                                     f"{state.get('message') or ''}"}
    return state


def _owner_hash(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()  # a session id is a secret of its browser: not kept as is


def _read_state(job_dir: Path) -> dict:
    for _ in range(5):  # written by rename, so a read sees a whole file; retry only an unlucky open
        try:
            return json.loads((job_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise TrainError(f"the state of job {job_dir.name} is unreadable")


def _read_pid(job_dir: Path) -> int | None:
    try:
        return int((job_dir / "pid").read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int, marker: str) -> bool:
    """Is `pid` a live (not zombie) process whose command line mentions `marker` (so a reused pid does not count)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
            return marker in (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True


def _log_tail(job_dir: Path, max_chars: int = 1500) -> str:
    try:
        text = (job_dir / "log.txt").read_bytes()[-max_chars:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.strip().splitlines())  # progress bars: last frame


def _job_model_config(cfg: TrainConfig):
    """The architecture a job will train, read without its weights: the preset for pretraining, else the config of
    the model folder (the default model's cached conversion). None where that needs a download (a Hub id not yet
    here): the job's own load checks the weights then."""
    from ..models.config import ModelConfig
    from ..loading import read_hf_config, resolve

    if cfg.mode == "pretrain":
        return ModelConfig.from_dict({**ModelConfig.from_name(cfg.preset).to_dict(), "vocab_size": cfg.vocab_size})
    source = cfg.model or "default"
    path = Path(source).expanduser()
    if source != "default" and not path.exists():
        return None
    return read_hf_config(resolve(source))


def check_job_memory(cfg: TrainConfig) -> None:
    """Refuse a job whose training step would not fit the memory budget, before its process starts: fp32 weights,
    the gradients and AdamW's two moments of what trains (LoRA: ~1 % of the model, counted as 2 %), and one
    micro-batch's activations, every layer's kept for the backward pass (budget.forward_parts)."""
    model_cfg = _job_model_config(cfg)
    if model_cfg is None:
        return
    n = budget.param_count(model_cfg)
    trainable = n // 50 if cfg.mode == "lora" else n
    seq = cfg.seq_len or min(256, model_cfg.max_seq_len)
    budget.check_forward(model_cfg, cfg.batch_size, seq, "float32", what="one training step of this job",
                         training=True, extra={"weights": 4 * n, "gradients and AdamW moments": 12 * trainable})

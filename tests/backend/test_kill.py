"""Kill tests: a GGUF conversion, an export and a finetune SIGKILLed midway leave nothing half-written that is used
afterwards, and the finetune resumes from its last complete checkpoint with nothing lost.

The conversion and the export are killed at fixed points (a child process stops itself at a progress message
and the parent kills it there); the finetune at seeded random moments while it trains and checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import backend
from backend.errors import ModelLoadError
from backend.training import TrainConfig, train
from backend.training.checkpoint import list_checkpoints, read_checkpoint
from tests.backend import bad_files as bf
from tests.backend.train_util import make_base, write_text

def _stop_at(marker: Path, point: str):
    """A progress callback that stops the process (for the parent to kill) at the first message starting `point`."""
    def progress(fraction, message):
        if message.startswith(point):
            marker.touch()
            time.sleep(600)
    return progress


def _run_in_child(work, *args):
    torch.set_num_threads(1)  # a forked child runs no thread pool it did not start itself
    try:
        work(*args)
    finally:
        os._exit(0)


def fork(work, *args):
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(work, *args))
    child.start()
    return child


def kill_at(work, marker: Path, *args, timeout: float = 120) -> None:
    """Run work(*args) in a forked child until it creates `marker`, then SIGKILL it there."""
    child = fork(work, *args)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert child.is_alive(), "the child ended before the kill point"
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()


def _convert(path: Path, cache: Path, marker: Path, point: str):
    import safetensors.torch as st

    from backend.formats.gguf import convert_gguf

    os.environ["FORNAX_CACHE"] = str(cache)
    progress = _stop_at(marker, point)
    if point == "saving":  # stop once the weights are written into the temporary folder, before the rename
        real = st.save_file

        def save_then_stop(*a, **k):
            real(*a, **k)
            progress(1.0, "saving")
        st.save_file = save_then_stop
    convert_gguf(path, progress)


@pytest.mark.parametrize("point", ["dequantizing blk.0", "saving"])
def test_gguf_conversion_killed_midway_leaves_no_usable_half(point, tmp_path, monkeypatch):
    path = bf.tiny_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    marker = tmp_path / "killed-here"
    kill_at(_convert, marker, path, cache, marker, point)
    converted = list((cache / "gguf").iterdir()) if (cache / "gguf").exists() else []
    assert all(p.name.startswith(".") for p in converted), converted          # only a hidden temporary folder
    assert not list(cache.rglob("config.json"))                               # nothing that looks converted
    monkeypatch.setenv("FORNAX_CACHE", str(cache))
    h = backend.load(path)                          # converts again; the half folder is never read
    assert h.config.vocab_size == 257 and h.logits(torch.tensor([[1, 2, 3]])).isfinite().all()


def _export(base: Path, out: Path, marker: Path):
    from export.onnx_export import export

    export(str(base), out, progress=_stop_at(marker, "checking parity"))


def test_export_killed_midway_leaves_no_usable_half(tmp_path):
    base = make_base(tmp_path / "base")
    out = tmp_path / "onnx"
    marker = tmp_path / "killed-here"
    kill_at(_export, marker, base, out, marker)    # model.onnx is written in the temporary folder by then
    assert not out.exists()
    assert [p.name.startswith(f".{out.name}.tmp-") for p in tmp_path.iterdir() if p.name.startswith(".")] == [True]
    with pytest.raises(ModelLoadError, match="no model at"):
        backend.load(out)
    from export.onnx_export import export

    export(str(base), out, verify=False)           # the same target works again
    import backend.__main__ as cli

    assert cli.main(["info", "--model", str(out)]) == 0  # item 9: the CLI on an ONNX folder (handle.model is None)


def _train(config: dict, job: Path):
    train(TrainConfig(**config), job_dir=job)


def _fork_train(config: dict, job: Path):
    return fork(_train, config, job)


def test_finetune_killed_at_random_moments_resumes_from_the_last_complete_checkpoint(tmp_path):
    """Forked (not spawned) so that each run starts in milliseconds: the kills land while it trains and saves."""
    base = make_base(tmp_path / "base")
    data = write_text(tmp_path / "corpus.txt", 6000)
    steps = 120  # enough that a quiet machine does not finish a run between two kills
    settings = dict(data=str(data), mode="full", model=str(base), steps=steps, seq_len=32, batch_size=4,
                    eval_every=0, sample_every=0, save_every=6, device="cpu", lr=1e-3, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the children
    try:
        reference = train(TrainConfig(**settings, out=str(tmp_path / "reference")))
    finally:
        torch.set_num_threads(threads)
    out, job = tmp_path / "run", tmp_path / "job"
    config = {**settings, "out": str(out)}
    rng = random.Random(0)
    kills = []
    for attempt in range(4):
        child = _fork_train({**config, "resume": attempt > 0}, job)
        start = [s for s, _ in list_checkpoints(out)]
        while child.is_alive() and [s for s, _ in list_checkpoints(out)] == start:
            time.sleep(0.005)                      # until this run has saved a checkpoint of its own
        time.sleep(rng.uniform(0.0, 0.1))
        if not child.is_alive():
            break                                  # it finished before this kill
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        found = list_checkpoints(out)
        assert found, "no complete checkpoint after a kill"
        read_checkpoint(found[-1][1])              # the newest one is whole (weights, trainer state, meta)
        kills.append(found[-1][0])
    assert len(kills) >= 2, kills
    assert kills == sorted(kills) and kills[-1] < steps
    final = _fork_train({**config, "resume": True}, job)
    final.join(timeout=120)
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "done" and [s for s, _ in state["train_loss"]] == list(range(1, steps + 1)), state["error"]
    a = torch.tensor([loss for _, loss in reference["train_loss"]])
    b = torch.tensor([loss for _, loss in state["train_loss"]])
    assert (a - b).abs().max().item() <= 1e-5, "the resumed run lost or changed steps"
    wa = backend.loading.read_hf_folder(tmp_path / "reference")[1]
    wb = backend.loading.read_hf_folder(out)[1]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5

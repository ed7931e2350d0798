"""One training loop for our models: LoRA, full finetuning, or pretraining from scratch; one process or many.

Per optimizer step: `grad_accum` micro-batches of `batch_size` sequences on each of `world` processes (torchrun + DDP,
gloo on CPU; or the model sharded with FSDP2, `--strategy fsdp`: fsdp.py). The loss of a step is a mean over the
whole global batch (each micro-batch's loss is divided by global totals: objectives.py), so a step is the same
computation whatever the split into micro-batches and processes. Global-norm gradient clipping, bf16 autocast on
CUDA (CPU stays fp32). Periodic validation, samples from fixed prompts, checkpoints. The set-up (model, data,
objective, LoRA, DDP / FSDP, optimizer, resume) is setup.py's; this module runs the steps and finishes the run.
"""
from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import FornaxError, TrainError
from ..models import family
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import Dist
from .progress import CANCEL_FILE, Reporter
from .setup import Run, set_up
from .validation import make_samples


def train(cfg: TrainConfig, job_dir: str | Path | None = None, should_stop: Callable[[], bool] | None = None,
          on_update: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
    """Run one training job to the end (or until should_stop() / the job's cancel file); returns the final state.

    With job_dir, the live state is written to job_dir/state.json and a file job_dir/cancel stops the run at the next
    step (a checkpoint is saved, status 'cancelled'). Under torchrun each process runs this; rank 0 reports and saves.
    """
    cfg = TrainConfig.from_dict(cfg.to_dict()).check()  # a private copy
    job_dir = Path(job_dir) if job_dir is not None else None
    if job_dir is not None:
        job_dir.mkdir(parents=True, exist_ok=True)  # `--job-dir DIR` on the command line may name a new folder
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = Dist.from_env(device.type)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    reporter = Reporter(cfg, job_dir, on_update, dist.main)

    def stop() -> bool:
        wanted = dist.main and ((should_stop is not None and should_stop()) or (
            job_dir is not None and (job_dir / CANCEL_FILE).exists()))
        return bool(dist.sum(torch.tensor([int(wanted)])).item())

    try:
        return _run(set_up(cfg, device, dist, reporter), stop, progress)
    except BaseException as e:
        message = str(e) if isinstance(e, FornaxError) else (
            "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        reporter.update(force=True, status="failed", error=message, message="failed")
        raise
    finally:
        dist.close()


def _run(run: Run, stop: Callable[[], bool], progress: bool) -> dict:
    cfg, reporter = run.cfg, run.reporter
    if progress and run.dist.main:
        reporter.open_bar(cfg.steps, run.start)
    if run.start == 0:
        validate(run, 0)
        sample(run, 0)
    order = EpochOrder(len(run.data.train), cfg.seed)
    train_seconds, tokens_done, step = 0.0, 0, run.start
    while step < cfg.steps:
        if stop():
            reporter.close_bar()
            return _cancelled(run, step)
        t0 = time.perf_counter()
        loss, n_tokens, lr = train_step(run, step_batches(run, order, step), step)
        step += 1
        train_seconds += time.perf_counter() - t0
        tokens_done += int(n_tokens)
        if not math.isfinite(loss):
            raise TrainError(f"the loss became {loss} at step {step}; lower the learning rate")
        reporter.state["train_loss"].append([step, loss])
        reporter.update(step=step, lr=lr, tokens_per_s=tokens_done / train_seconds, message="training")
        if reporter.bar is not None:
            reporter.bar.update(1)
            reporter.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_done / train_seconds:.0f}")
        if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
            validate(run, step)
        if cfg.sample_every and (step == cfg.steps or step % cfg.sample_every == 0):
            sample(run, step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save(run, step)
    reporter.close_bar()
    return _finish(run, step)


# --- the steps ---
class EpochOrder:
    """The order of the training set: a fixed permutation per epoch (seeded by the run's seed), walked in order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.order = n, seed, None, []

    def __getitem__(self, k: int) -> int:
        """The k-th example the run visits, counting over all epochs."""
        epoch = k // self.n
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.order = epoch, torch.randperm(self.n, generator=g).tolist()
        return self.order[k % self.n]


def step_batches(run: Run, order: EpochOrder, step: int) -> list[list[int]]:
    """This process's micro-batches of global step `step` (micro-batch m of rank r is slice m * world + r)."""
    first, B, world, rank = step * run.global_batch, run.cfg.batch_size, run.dist.world, run.dist.rank
    index = [order[k] for k in range(first, first + run.global_batch)]
    return [index[(m * world + rank) * B:(m * world + rank + 1) * B] for m in range(run.cfg.grad_accum)]


def train_step(run: Run, micro: list[list[int]], step: int) -> tuple[float, float, float]:
    """One optimizer step over this process's micro-batches: (the step's loss over the global batch, the global
    batch's input tokens, the learning rate it used)."""
    objective, dist, device = run.objective, run.dist, run.device
    batches = objective.batches(run.data.train, micro, step)
    *totals, n_tokens = dist.sum(torch.tensor([objective.counts(b) for b in batches],
                                              dtype=torch.float64).sum(0)).tolist()  # over the global batch
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 1.0
    for m, batch in enumerate(batches):
        sync = contextlib.nullcontext() if dist.world == 1 or m == len(batches) - 1 or run.fsdp is not None \
            else run.wrapped.no_sync()  # (FSDP2 reduce-scatters each micro-batch's gradients into the shards)
        with sync:
            loss, n = objective.loss(run.wrapped, batch, totals, device)
            # DDP averages gradients over processes; * world undoes that, / n makes the global mean
            (loss * (dist.world / n)).backward()
        loss_sum += loss.detach().double()
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.named.values(), run.cfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return dist.sum(loss_sum.cpu()).item() / n, n_tokens, lr


# --- validation, samples, checkpoints ---
def validate(run: Run, step: int):
    model = run.gathered(step, run.module)
    if not run.dist.main:
        return
    state = run.reporter.state
    if len(run.data.val):
        loss, ppl, metrics, lines = run.objective.evaluate(model, run.data.val, run.cfg.batch_size, run.device)
        state["val_loss"].append([step, loss, ppl])
        if metrics is not None:
            state["metrics"] = {"step": step, **metrics}
        for line in lines.splitlines():
            run.reporter.log(f"step {step}: {line}")
    run.reporter.update(force=True)


def sample(run: Run, step: int):
    prompts = run.cfg.sample_prompts or run.data.prompts
    if not (run.cfg.sample_every and prompts and family(run.core.config).generates):
        return
    model = run.gathered(step, run.core)
    if not run.dist.main:
        return
    run.reporter.state["samples"] += make_samples(model, run.tokenizer, prompts, run.data.task, step,
                                                  run.cfg.sample_tokens, run.cfg.seed)
    run.reporter.update(force=True)


def save(run: Run, step: int):
    """A resumable checkpoint of step `step` (FSDP: the whole tensors, gathered by every rank; rank 0 writes)."""
    cfg, fsdp, reporter = run.cfg, run.fsdp, run.reporter
    weights = fsdp.full_weights(run.named) if fsdp is not None else run.named
    optimizer = fsdp.full_optimizer(run.optimizer) if fsdp is not None else run.optimizer.state_dict()
    if not run.dist.main:
        return
    reporter.update(force=True, message=f"saving checkpoint {step}")
    trainer = {"step": torch.tensor(step), "optimizer": optimizer, "scheduler": run.scheduler.state_dict(),
               "rng": ckpt.rng_state()}
    meta = {"config": cfg.to_dict(), "step": step, "global_batch": run.global_batch, "data_sha256": run.fingerprint,
            "history": reporter.history()}

    def extra(folder: Path):
        if cfg.mode == "pretrain":
            run.tokenizer.save(folder)
            ckpt.write_json_atomic(folder / "model_config.json", run.core.config.to_dict())
    try:
        ckpt.save_checkpoint(run.out, step, weights, trainer, meta, extra)
    except OSError as e:
        raise TrainError(f"could not write a checkpoint to {run.out}: {e}") from e
    reporter.update(force=True, message="training")


# --- the end of a run ---
def _cancelled(run: Run, step: int) -> dict:
    if step > run.start:  # (else nothing new: the checkpoint resumed from, or no step at all)
        save(run, step)
    run.reporter.update(force=True, status="cancelled", message=f"cancelled at step {step}; resumable from {run.out}")
    return dict(run.reporter.state)


def _finish(run: Run, step: int) -> dict:
    """Save the trained model (LoRA merged into its weights) where the run was told, with its training report, and
    record the final validation in the scores history."""
    reporter, out = run.reporter, run.out
    final = run.gathered(step, run.core)  # FSDP: the whole model on rank 0 (collective)
    if run.dist.main:
        reporter.update(force=True, message="saving the model")
        if run.cfg.mode == "lora":
            from .lora import merge_lora

            final = merge_lora(run.module)
        final.eval()
        from ..loading import save_pretrained

        try:
            save_pretrained(final, run.tokenizer, out)
        except FornaxError as e:
            raise TrainError(str(e)) from e
        reporter.state.update(status="done", message=f"saved to {out}")
        ckpt.write_json_atomic(out / "training.json", {k: reporter.state[k] for k in (
            "config", "train_loss", "val_loss", "samples", "metrics", "tokens_per_s", "data", "trainable_params")})
        _record(run, final)
    reporter.update(force=True, status="done")
    return dict(reporter.state)


def _record(run: Run, final: torch.nn.Module):
    """The scores history (backend/scoring/history.py) gets the final validation numbers; never fails the run."""
    try:
        from ..scoring.history import record_finetune

        record_finetune(run.out, final, run.cfg.data, run.reporter.state, run.cfg.to_dict())
    except (FornaxError, OSError, sqlite3.Error) as e:
        run.reporter.log(f"could not record the run in the scores history: {e}")

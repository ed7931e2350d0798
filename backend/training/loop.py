"""One training loop for our Transformer: LoRA, full finetuning, or pretraining from scratch; one process or many.

Per optimizer step: `grad_accum` micro-batches of `batch_size` sequences on each of `world` processes (torchrun + DDP,
gloo on CPU; or the model sharded with FSDP2, `--strategy fsdp`: fsdp.py). The loss of a step is the mean over every target token of the whole global batch (each micro-batch's
summed loss is divided by the global target count), so a step is the same computation whatever the split into
micro-batches and processes. AdamW with decoupled weight decay on >= 2-D parameters only (matrices and embeddings;
not norms, biases), linear warm-up then cosine decay to min_lr_ratio * lr, global-norm gradient clipping, bf16
autocast on CUDA (CPU stays fp32). Periodic validation loss and perplexity, samples from fixed prompts, checkpoints.
An encoder brings its own objective (masked LM [+ next sentence], or its classification head: see
encoder_classify.py) for the batches, the loss and the validation; everything else is this same loop.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..models.config import ModelConfig
from ..errors import FornaxError, TrainError
from ..models import LanguageModel, family
from ..formats.tokenizer import Tokenizer
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import IGNORE, Records, build_data, read_records
from .distributed import Dist
from ..scoring.validation import autocast, evaluate_classify, evaluate_loss, make_samples

STATE_FILE, CANCEL_FILE = "state.json", "cancel"
# Settings that change the computation: a run resumes only with the same ones.
RESUME_FREE = {"out", "resume", "eval_every", "sample_every", "save_every", "sample_prompts", "sample_tokens", "device",
               "batch_size", "grad_accum", "kernels"}  # (the global batch is compared instead of its split; the
# kernels compute the same losses to float rounding)


# --- progress reporting ---
class Reporter:
    """The run's live state (the dict the job runner's state.json holds), written atomically at most every
    `interval` seconds and at every event that matters."""

    def __init__(self, cfg: TrainConfig, job_dir: Path | None, on_update: Callable[[dict], None] | None,
                 main: bool = True, interval: float = 0.5):
        self.job_dir, self.on_update, self.main, self.interval = job_dir, on_update, main, interval
        prior = {}
        if job_dir is not None and (job_dir / STATE_FILE).exists():
            try:
                prior = json.loads((job_dir / STATE_FILE).read_text())
            except ValueError:
                prior = {}
        now = time.time()
        self.state = dict(id=prior.get("id", job_dir.name if job_dir else ""), status="starting", step=0,
                          total_steps=cfg.steps, tokens_per_s=0.0, train_loss=[], val_loss=[], samples=[], metrics={},
                          error=None, out_dir=str(Path(cfg.out).expanduser()), config=cfg.to_dict(),
                          started=prior.get("started", now), updated=now, pid=os.getpid(), message="starting",
                          lr=0.0, data=None)
        self._last = 0.0
        self.flush()

    def update(self, force: bool = False, **kw):
        self.state.update(kw)
        if force or time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self):
        self._last = time.monotonic()
        self.state["updated"] = time.time()
        if not self.main:
            return
        if self.job_dir is not None:
            ckpt.write_json_atomic(self.job_dir / STATE_FILE, self.state)
        if self.on_update is not None:
            self.on_update(dict(self.state))

    def history(self) -> dict:
        return {k: self.state[k] for k in ("train_loss", "val_loss", "samples", "metrics")}


# --- schedule and optimizer ---
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for update number `step` (0-based): linear warm-up, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(named: dict[str, torch.nn.Parameter], cfg: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices and embeddings (>= 2-D) only, never on norms and biases."""
    decay = [p for p in named.values() if p.ndim >= 2]
    no_decay = [p for p in named.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.peak_lr, betas=tuple(cfg.betas),
                                  fused=device.type in ("cpu", "cuda"))  # one kernel over all tensors
    warmup, total, floor = cfg.warmup, cfg.steps, cfg.min_lr_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, floor))
    return optimizer, scheduler


# --- the output folder and resuming ---
def check_out_folder(out: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses a folder that holds anything else."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"the output {out} is a file; give a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(f".{ckpt.PREFIX}")] if out.is_dir() else []
    found = ckpt.list_checkpoints(out)
    if found and cfg.resume:
        return found[-1][1]
    if found:
        raise TrainError(f"{out} holds a checkpoint of an earlier run (step {found[-1][0]}): resume it (--resume) "
                         f"or choose another output folder")
    if entries:
        raise TrainError(f"the output folder {out} exists and is not empty; choose a new folder "
                         f"(training never overwrites a model)")
    return None


def _fingerprint(path: str) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def _check_resume(meta: dict, cfg: TrainConfig, fingerprint: str, world: int, path: Path):
    ckpt.check_meta(meta, path, complete=True)
    saved = TrainConfig.from_dict(meta["config"])
    diff = [f"{k}={getattr(saved, k)!r} (now {getattr(cfg, k)!r})" for k in saved.to_dict()
            if k not in RESUME_FREE and saved.to_dict()[k] != cfg.to_dict()[k]]
    if meta["global_batch"] != cfg.batch_size * cfg.grad_accum * world:
        diff.append(f"global batch {meta['global_batch']} (now {cfg.batch_size * cfg.grad_accum * world})")
    if diff:
        raise TrainError(f"{path} was made with other settings; resume with the same ones: {'; '.join(diff)}")
    if meta["data_sha256"] != fingerprint:
        raise TrainError(f"the data file {cfg.data} changed since {path} was saved; resuming would not continue "
                         f"the same run")


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
        return _run(cfg, device, dist, reporter, stop, progress)
    except BaseException as e:
        message = str(e) if isinstance(e, FornaxError) else (
            "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        reporter.update(force=True, status="failed", error=message, message="failed")
        raise
    finally:
        dist.close()


def _run(cfg: TrainConfig, device: torch.device, dist: Dist, reporter: Reporter, stop, progress: bool) -> dict:
    out = Path(cfg.out).expanduser()
    records = read_records(cfg.data, cfg.task)
    resume_from = check_out_folder(out, cfg)
    fingerprint = _fingerprint(cfg.data)
    weights = trainer = meta = None
    if resume_from is not None:
        weights, trainer, meta = ckpt.read_checkpoint(resume_from)
        _check_resume(meta, cfg, fingerprint, dist.world, resume_from)

    core, tokenizer = _model_and_tokenizer(cfg, records, resume_from, device, dist, reporter)
    context = core.config.max_seq_len
    seq_len = cfg.seq_len or min(256, context)
    if seq_len > context:
        raise TrainError(f"seq_len {seq_len} is beyond the model's context of {context} tokens")
    reporter.update(force=True, message="tokenizing the data")
    fam = family(core.config)
    objective = None  # None: next-token loss; else an encoder's (masked LM [+ NSP], classification head)
    if fam.objective == "encoder":
        from .encoder_classify import encoder_objective

        data, objective = encoder_objective(cfg, core, tokenizer, records, seq_len)
    else:
        data = build_data(records, tokenizer, seq_len, cfg.val_fraction, cfg.seed)
    if (data.task == "chat" and not fam.chats) or (cfg.mode == "lora" and not fam.lora):
        raise TrainError(f"{fam.described} has no chat template and no attention projections for LoRA: train "
                         "it on text (--task lm) with --mode pretrain or full")
    prompts = cfg.sample_prompts or data.prompts

    core.train()
    torch.manual_seed(cfg.seed)
    if cfg.mode == "lora":  # (an encoder classifier's pooler + classifier train whole: peft's modules_to_save)
        from .lora import add_lora

        core.requires_grad_(False)
        module = add_lora(core, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        core.requires_grad_(True)
        module = core
    fsdp = None
    if cfg.strategy == "fsdp" and dist.world > 1:  # FSDP2: parameters become shards before the optimizer sees them
        from .fsdp import Sharded, check_fsdp

        check_fsdp(cfg, fam)
        fsdp = Sharded(core, dist)
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    optimizer, scheduler = make_optimizer(named, cfg, device)
    start = 0
    if resume_from is not None:
        missing = sorted(set(named) ^ set(weights))
        if missing:
            raise TrainError(f"{resume_from} does not match this model (e.g. {missing[:2]})")
        if fsdp is not None:  # each process takes its shards of the whole tensors
            fsdp.load(weights, optimizer, trainer["optimizer"])
        else:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(weights[n])
            optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        ckpt.set_rng_state(trainer["rng"])
        start = int(trainer["step"])
        reporter.update(**meta["history"])
    fused = None
    if cfg.kernels == "triton" and objective is None:  # (an encoder's objectives run eager)
        from .fused import TritonLoss

        fused = TritonLoss(core, device)
    wrapped = module
    if dist.world > 1 and fsdp is None:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)  # rotary tables: equal everywhere

    n_trainable = sum(p.numel() for p in named.values())
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world
    reporter.update(force=True, status="running", step=start, message="training", data=data.summary,
                    seq_len=seq_len, trainable_params=n_trainable, world_size=dist.world,
                    total_params=sum(p.numel() for p in core.parameters()))
    if dist.main:
        print(f"[fornax] {cfg.mode} {data.task}: {data.summary}; {n_trainable:,} trainable parameters; "
              f"global batch {global_batch} x {seq_len} tokens; {dist.world} process(es) on {device}", file=sys.stderr)

    def save(step: int):
        weights_now = fsdp.full_weights(named) if fsdp is not None else named  # (FSDP: gathered by every rank)
        optimizer_now = fsdp.full_optimizer(optimizer) if fsdp is not None else None
        if not dist.main:
            return
        reporter.update(force=True, message=f"saving checkpoint {step}")
        trainer_state = {"step": torch.tensor(step),
                         "optimizer": optimizer_now if fsdp is not None else optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state()}
        meta_out = {"config": cfg.to_dict(), "step": step, "global_batch": global_batch, "data_sha256": fingerprint,
                    "history": reporter.history()}

        def extra(folder: Path):
            if cfg.mode == "pretrain":
                tokenizer.save(folder)
                ckpt.write_json_atomic(folder / "model_config.json", core.config.to_dict())
        try:
            ckpt.save_checkpoint(out, step, weights_now, trainer_state, meta_out, extra)
        except OSError as e:
            raise TrainError(f"could not write a checkpoint to {out}: {e}") from e
        reporter.update(force=True, message="training")

    def evaluate(step: int):
        model = fsdp.gathered(step) if fsdp is not None else module  # FSDP: rank 0's whole copy (collective)
        if not dist.main:
            return
        if len(data.val) and objective is not None:
            loss, ppl, metrics, line = objective.evaluate(model, data.val, cfg.batch_size, device)
            reporter.state["val_loss"].append([step, loss, ppl])
            reporter.state["metrics"] = {"step": step, **metrics}
            _log(bar, f"step {step}: {line}")
        elif len(data.val):
            loss, ppl = evaluate_loss(model, data.val, cfg.batch_size, device)
            reporter.state["val_loss"].append([step, loss, ppl])
            _log(bar, f"step {step}: val loss {loss:.4f}, perplexity {ppl:.2f}")
        if data.task == "classify" and data.val_records and objective is None:
            metrics = evaluate_classify(model, tokenizer, data.val_records, data.labels, seq_len, device)
            reporter.state["metrics"] = {"step": step, **metrics, "method": "label words"}
            _log(bar, f"step {step}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
                      f"(majority {metrics['majority_baseline']:.3f})")
        reporter.update(force=True)

    def sample(step: int):
        if cfg.sample_every and prompts and fam.generates:
            model = fsdp.gathered(step) if fsdp is not None else core  # FSDP: rank 0's whole copy (collective)
            if not dist.main:
                return
            reporter.state["samples"] += make_samples(model, tokenizer, prompts, data.task, step, cfg.sample_tokens,
                                                      cfg.seed)
            reporter.update(force=True)

    bar = None
    if progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.1 if sys.stderr.isatty() else 5.0)  # a log file gets a line every 5 s
    if start == 0:
        evaluate(0)
        sample(0)

    # the global batch of a step: a fixed permutation of the training set per epoch, walked in order
    n_train = len(data.train)
    orders: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:
        if epoch not in orders:
            orders.clear()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(n_train, generator=g).tolist()
        return orders[epoch]

    def step_batches(step: int) -> list[list[int]]:
        """This process's micro-batches of global step `step` (micro-batch m of rank r is slice m * world + r)."""
        first = step * global_batch
        index = [order(k // n_train)[k % n_train] for k in range(first, first + global_batch)]
        B = cfg.batch_size
        return [index[(m * dist.world + dist.rank) * B:(m * dist.world + dist.rank + 1) * B]
                for m in range(cfg.grad_accum)]

    pad_id = 0
    train_seconds, tokens_done = 0.0, 0
    step = start
    status = "done"
    vocab = core.config.vocab_size
    while step < cfg.steps:
        if stop():
            status = "cancelled"
            break
        t0 = time.perf_counter()
        micro = step_batches(step)
        if objective is not None:  # each loss term is a mean over the global batch: its totals summed first
            batches = objective.batches(data.train, micro, step)
            totals = dist.sum(torch.tensor([objective.counts(b) for b in batches], dtype=torch.float64).sum(0))
            *totals, n_tokens = totals.tolist()
            n_targets = 1.0
        else:
            batches = [data.train.batch(idx, pad_id) for idx in micro]
            counts = torch.tensor([sum(int((y != IGNORE).sum()) for _, y in batches),                 # targets
                                   sum(len(data.train.ids[i]) - 1 for idx in micro for i in idx)],  # input tokens
                                  dtype=torch.float64)
            n_targets, n_tokens = dist.sum(counts).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for m, batch in enumerate(batches):
            sync = contextlib.nullcontext() if dist.world == 1 or m == len(batches) - 1 or fsdp is not None \
                else wrapped.no_sync()  # (FSDP2 reduce-scatters each micro-batch's gradients into the shards)
            with sync:
                if objective is not None:                                       # already divided by the totals
                    loss = objective.loss(wrapped, batch, totals, device)
                elif fused is not None:                                         # Triton: no (B, T, V) logits
                    x, y = batch
                    with autocast(device):
                        loss = fused.loss_sum(wrapped, x.to(device), y.to(device))
                else:
                    x, y = batch
                    with autocast(device):
                        logits = wrapped(x.to(device))                          # (B, T, V)
                    loss = F.cross_entropy(logits.float().view(-1, vocab), y.to(device).view(-1),
                                           ignore_index=IGNORE, reduction="sum")
                # DDP averages gradients over processes; * world undoes that, / n_targets is the global mean
                (loss * (dist.world / n_targets)).backward()
            loss_sum += loss.detach().double()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(named.values(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = dist.sum(loss_sum.cpu()).item() / n_targets
        step += 1
        train_seconds += time.perf_counter() - t0
        tokens_done += int(n_tokens)
        if not math.isfinite(step_loss):
            raise TrainError(f"the loss became {step_loss} at step {step}; lower the learning rate")
        reporter.state["train_loss"].append([step, step_loss])
        reporter.update(step=step, lr=lr, tokens_per_s=tokens_done / train_seconds, message="training")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_done / train_seconds:.0f}")
        if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
            evaluate(step)
        if cfg.sample_every and (step == cfg.steps or step % cfg.sample_every == 0):
            sample(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save(step)
    if bar is not None:
        bar.close()

    if status == "cancelled":
        if step > start:  # (else nothing new: the checkpoint resumed from, or no step at all)
            save(step)
        reporter.update(force=True, status="cancelled", message=f"cancelled at step {step}; resumable from {out}")
        return dict(reporter.state)
    gathered = fsdp.gathered(step) if fsdp is not None else None  # FSDP: the whole model on rank 0 (collective)
    if dist.main:
        reporter.update(force=True, message="saving the model")
        final = gathered if gathered is not None else core
        if cfg.mode == "lora":
            from .lora import merge_lora

            final = merge_lora(module)
        final.eval()
        from ..loading import save_pretrained

        try:
            save_pretrained(final, tokenizer, out)
        except FornaxError as e:
            raise TrainError(str(e)) from e
        reporter.state.update(status="done", message=f"saved to {out}")
        ckpt.write_json_atomic(out / "training.json", {k: reporter.state[k] for k in (
            "config", "train_loss", "val_loss", "samples", "metrics", "tokens_per_s", "data", "trainable_params")})
        try:  # the scores history (backend/scoring) gets the final validation numbers; never fails the run
            from ..scoring.history import record_finetune

            record_finetune(out, final, cfg.data, reporter.state, cfg.to_dict())
        except (FornaxError, OSError, sqlite3.Error) as e:
            _log(bar, f"could not record the run in the scores history: {e}")
    reporter.update(force=True, status="done")
    return dict(reporter.state)


def _model_and_tokenizer(cfg: TrainConfig, records: Records, resume_from: Path | None, device: torch.device, dist: Dist,
                         reporter: Reporter) -> tuple[LanguageModel, Tokenizer]:
    """The model to train (fp32, row-major weights) and its tokenizer: loaded for lora/full; for pretrain a new
    byte-level BPE tokenizer trained on the data (or the checkpoint's) and a freshly initialised preset model."""
    if cfg.mode != "pretrain":
        reporter.update(force=True, message=f"loading {cfg.model}")
        from ..loading import load

        try:
            handle = load(cfg.model, dtype="float32", device=device)
        except FornaxError as e:
            raise TrainError(f"could not load the model {cfg.model!r}: {e}") from e
        if handle.model is None:
            raise TrainError(f"{cfg.model} is an exported ONNX graph; train the PyTorch model it came from")
        model = handle.model.contiguous_layout()
        if handle.family.classifies and records.task == "classify":
            from ..models.encoder import Encoder
            from .encoder_classify import check_labels

            if model.is_classifier:
                check_labels(model.config.labels, records.labels, cfg.model)
            else:  # a masked-LM folder gets a new head over the file's labels
                model = Encoder.with_classifier(model, records.labels, cfg.seed)
        return model, handle.tokenizer
    if resume_from is not None:
        tokenizer = Tokenizer.from_folder(resume_from)
        mcfg = ModelConfig.from_dict(json.loads((resume_from / "model_config.json").read_text()))
    else:
        reporter.update(force=True, message="training the tokenizer")
        mcfg = ModelConfig.from_name(cfg.preset)
        if family(mcfg).pretrain_tokenizer == "wordpiece":  # as BERT's (deterministic: every rank trains the same one)
            from .mlm import train_wordpiece

            tokenizer = train_wordpiece(records.corpus, cfg.vocab_size)
            mcfg.pad_token_id = tokenizer.token_to_id("[PAD]")
            mcfg.nsp_head = cfg.nsp
        else:
            tokenizer = _shared_tokenizer(records.corpus, cfg.vocab_size, dist)
            mcfg.eos_token_ids = [tokenizer.token_to_id(tokenizer.eos_token)]
        mcfg.vocab_size = tokenizer.vocab_size
        mcfg.bos_token_id, mcfg.name = None, f"fornax-{cfg.preset}"
    torch.manual_seed(cfg.seed)
    core = new_model(mcfg).to(device)
    core.init_weights()
    return core, tokenizer


def new_model(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly built model of the preset's family (random weights come from its init_weights)."""
    return family(cfg).new(cfg)


def _shared_tokenizer(corpus: str, vocab_size: int, dist: Dist) -> Tokenizer:
    """Rank 0 trains the tokenizer; every other rank receives it (as JSON), so all hold the same vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer

    from .bpe import train_tokenizer

    tok = train_tokenizer(corpus, vocab_size) if dist.main else None
    if dist.world == 1:
        return tok
    blob = dist.broadcast_bytes(tok.tk.to_str().encode() if dist.main else None)
    if dist.main:
        return tok
    from .bpe import CHATML, EOS

    return Tokenizer(HFTokenizer.from_str(blob.decode()), bos_token=None, eos_token=EOS, chat_template=CHATML)


def _log(bar, text: str):
    if bar is not None:
        bar.write(text, file=sys.stderr)
    else:
        print(f"[fornax] {text}", file=sys.stderr)

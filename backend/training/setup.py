"""Setting up a training run: the output folder and the checkpoint to resume, the model and its tokenizer, the
data and the objective, LoRA, DDP or FSDP, the optimizer and its schedule, and the state resumed into them.

AdamW with decoupled weight decay on >= 2-D parameters only (matrices and embeddings; not norms, biases), linear
warm-up then cosine decay to min_lr_ratio * lr. A run resumes only with the settings that change its computation
(and the same data file)."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.records import Records, read_records
from ..errors import FornaxError, TrainError
from ..formats.tokenizer import Tokenizer
from ..models import LanguageModel, family
from ..models.config import ModelConfig
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import Data
from .distributed import Dist
from .objectives import Objective, objective_for
from .progress import Reporter

# Settings that change the computation: a run resumes only with the same ones.
RESUME_FREE = {"out", "resume", "eval_every", "sample_every", "save_every", "sample_prompts", "sample_tokens", "device",
               "batch_size", "grad_accum", "kernels"}  # (the global batch is compared instead of its split; the
# kernels compute the same losses to float rounding)


@dataclass
class Run:
    """Everything a run's steps, validation, samples and checkpoints use, made once by set_up."""
    cfg: TrainConfig
    device: torch.device
    dist: Dist
    reporter: Reporter
    out: Path
    fingerprint: str                        # of the data file: a resume must see the same one
    core: torch.nn.Module                   # the model
    tokenizer: Tokenizer
    module: torch.nn.Module                 # what trains: core, or its LoRA (peft) wrapper
    wrapped: torch.nn.Module                # module under DDP when several processes run it (else module)
    fsdp: object | None                     # fsdp.Sharded, or None
    data: Data
    objective: Objective
    seq_len: int
    named: dict[str, torch.nn.Parameter]    # the trainable parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start: int                              # the step resumed from (0: a fresh run)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world

    def gathered(self, step: int, whole: torch.nn.Module) -> torch.nn.Module:
        """The model to validate or sample: under FSDP rank 0's whole copy (a collective: every rank calls it)."""
        return self.fsdp.gathered(step) if self.fsdp is not None else whole


def set_up(cfg: TrainConfig, device: torch.device, dist: Dist, reporter: Reporter) -> Run:
    out = Path(cfg.out).expanduser()
    records = read_records(cfg.data, cfg.task)
    resume_from = check_out_folder(out, cfg)
    fingerprint = _fingerprint(cfg.data)
    saved = None
    if resume_from is not None:
        saved = ckpt.read_checkpoint(resume_from)  # (weights, trainer state, meta)
        _check_resume(saved[2], cfg, fingerprint, dist.world, resume_from)

    core, tokenizer = model_and_tokenizer(cfg, records, resume_from, device, dist, reporter)
    context = core.config.max_seq_len
    seq_len = cfg.seq_len or min(256, context)
    if seq_len > context:
        raise TrainError(f"seq_len {seq_len} is beyond the model's context of {context} tokens")
    reporter.update(force=True, message="tokenizing the data")
    data, objective = objective_for(cfg, core, tokenizer, records, seq_len, device)

    core.train()
    torch.manual_seed(cfg.seed)
    module = _trainable(cfg, core)
    fsdp = None
    if cfg.strategy == "fsdp" and dist.world > 1:  # FSDP2: parameters become shards before the optimizer sees them
        from .fsdp import Sharded, check_fsdp

        check_fsdp(cfg, family(core.config))
        fsdp = Sharded(core, dist)
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    optimizer, scheduler = make_optimizer(named, cfg, device)
    start = 0
    if saved is not None:
        start = _resume(saved, resume_from, named, fsdp, optimizer, scheduler, reporter)
    run = Run(cfg, device, dist, reporter, out, fingerprint, core, tokenizer, module, _ddp(module, dist, device, fsdp),
              fsdp, data, objective, seq_len, named, optimizer, scheduler, start)
    _announce(run)
    return run


def _trainable(cfg: TrainConfig, core: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters train: LoRA adapters over a frozen core, or the whole core."""
    if cfg.mode == "lora":  # (an encoder classifier's pooler + classifier train whole: peft's modules_to_save)
        from .lora import add_lora

        core.requires_grad_(False)
        return add_lora(core, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    core.requires_grad_(True)
    return core


def _resume(saved: tuple, path: Path, named: dict, fsdp, optimizer, scheduler, reporter: Reporter) -> int:
    """Load a checkpoint's weights, optimizer, schedule, random generators and history; returns its step."""
    weights, trainer, meta = saved
    missing = sorted(set(named) ^ set(weights))
    if missing:
        raise TrainError(f"{path} does not match this model (e.g. {missing[:2]})")
    if fsdp is not None:  # each process takes its shards of the whole tensors
        fsdp.load(weights, optimizer, trainer["optimizer"])
    else:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(weights[n])
        optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    ckpt.set_rng_state(trainer["rng"])
    reporter.update(**meta["history"])
    return int(trainer["step"])


def _ddp(module: torch.nn.Module, dist: Dist, device: torch.device, fsdp) -> torch.nn.Module:
    if dist.world == 1 or fsdp is not None:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)  # rotary tables: equal everywhere


def _announce(run: Run):
    cfg, dist, data = run.cfg, run.dist, run.data
    n_trainable = sum(p.numel() for p in run.named.values())
    run.reporter.update(force=True, status="running", step=run.start, message="training", data=data.summary,
                        seq_len=run.seq_len, trainable_params=n_trainable, world_size=dist.world,
                        total_params=sum(p.numel() for p in run.core.parameters()))
    if dist.main:
        print(f"[fornax] {cfg.mode} {data.task}: {data.summary}; {n_trainable:,} trainable parameters; global batch "
              f"{run.global_batch} x {run.seq_len} tokens; {dist.world} process(es) on {run.device}", file=sys.stderr)


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


# --- the model and its tokenizer ---
def model_and_tokenizer(cfg: TrainConfig, records: Records, resume_from: Path | None, device: torch.device,
                        dist: Dist, reporter: Reporter) -> tuple[LanguageModel, Tokenizer]:
    """The model to train (fp32, row-major weights) and its tokenizer: loaded for lora/full; for pretrain a new
    byte-level BPE tokenizer trained on the data (or the checkpoint's) and a freshly initialised preset model."""
    if cfg.mode != "pretrain":
        return _loaded(cfg, records, device, reporter)
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


def _loaded(cfg: TrainConfig, records: Records, device: torch.device, reporter: Reporter
            ) -> tuple[LanguageModel, Tokenizer]:
    """The model folder to finetune, fp32 and row-major; a masked-LM encoder gets a new head for labelled rows."""
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

"""TrainConfig: every hyper-parameter of one training run, JSON round-trippable (the job runner ships it as a file)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..models import family
from ..models.config import PRESETS
from .. import limits
from ..errors import TrainError

MODES = ("lora", "full", "pretrain")
KERNELS = ("eager", "triton")
STRATEGIES = ("ddp", "fsdp")      # under torchrun: replicate the model (DDP) or shard it (FSDP2, training/fsdp.py)
TASKS = ("auto", "lm", "chat", "classify")
# Learning rates that move a model visibly in a few hundred steps without blowing it up.
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5, "pretrain": 2e-3}


@dataclass
class TrainConfig:
    data: str = ""                   # .txt (lm), .jsonl (lm / chat / classify) or .csv (classify); see data.py
    out: str = ""                    # checkpoints while training, then the final HF-style model folder
    mode: str = "lora"               # lora | full | pretrain (from scratch: new tokenizer + preset architecture)
    task: str = "auto"               # auto (from the file) | lm | chat | classify
    model: str = "default"           # what backend.load accepts; unused by pretrain
    preset: str = "tiny-llama"       # pretrain: architecture from backend.models.config.PRESETS
    vocab_size: int = 512            # pretrain: byte-level BPE vocabulary size (incl. 256 bytes + specials)
    steps: int = 200                 # optimizer steps
    lr: float | None = None          # peak learning rate; None = DEFAULT_LR[mode]
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # None = 5% of steps (at least 1)
    weight_decay: float = 0.1        # decoupled (AdamW), on >= 2-D parameters only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0           # max global grad norm; 0 = off
    batch_size: int = 8              # sequences per micro-batch per process
    grad_accum: int = 1              # micro-batches per optimizer step
    seq_len: int | None = None       # tokens per training sequence; None = min(256, the model's context)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None = every projection: attn.qkv attn.proj mlp.gate_up|mlp.up mlp.down
    eval_every: int = 50             # validation loss / perplexity (and classify metrics) every N steps, before the
                                     # first and after the last; 0 = only before and after
    sample_every: int = 100          # samples from sample_prompts every N steps, before the first and after the
                                     # last; 0 = off
    save_every: int = 100            # checkpoint every N steps (and on cancel); 0 = only on cancel
    sample_prompts: list[str] = field(default_factory=list)  # [] = taken from the validation data
    sample_tokens: int = 48
    seed: int = 0
    val_fraction: float = 0.1
    resume: bool = False             # continue from the newest checkpoint in `out` (if there is one)
    device: str | None = None        # None = cuda if available else cpu
    kernels: str = "eager"           # eager | triton: our Triton ops + fused linear cross-entropy (training/fused.py)
    nsp: bool = False                # pretrain an encoder (bert preset) with next-sentence prediction on sentence pairs
    strategy: str = "ddp"            # ddp | fsdp: how several torchrun processes hold the model (one process: ddp)

    # --- serialisation ---
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown training option(s): {', '.join(unknown)}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    # --- derived ---
    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def check(self) -> "TrainConfig":
        """Raise TrainError for a value no run could use (the data and the model are checked when they load)."""
        def need(ok: bool, message: str):
            if not ok:
                raise TrainError(message)

        need(bool(self.data), "no training data: give a file (--data)")
        need(bool(self.out), "no output folder: give one (--out)")
        need(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        need(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        need(self.kernels in KERNELS, f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        need(self.mode != "pretrain" or self.preset in PRESETS,
             f"no preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        need(self.mode == "pretrain" or bool(self.model), "no model to finetune: give one (--model)")
        need(isinstance(self.nsp, bool), f"nsp must be true or false, got {self.nsp!r}")
        need(not self.nsp or (self.mode == "pretrain" and family(PRESETS[self.preset]["family"]).fills_masks),
             "next-sentence prediction (--nsp) is for pretraining an encoder: --mode pretrain --preset tiny-bert")
        need(300 <= self.vocab_size <= 65536, f"vocab_size must be in [300, 65536], got {self.vocab_size}")
        for name in ("steps", "batch_size", "grad_accum", "lora_r", "sample_tokens"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "lora_alpha",
                     "lora_dropout", "val_fraction", "seed"):
            v = getattr(self, name)
            need((v is None and name in ("lr", "warmup_steps")) or (
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
                f"{name} must be a number, got {v!r}")
        need(isinstance(self.betas, (list, tuple)) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas), "betas must be two numbers")
        need(isinstance(self.sample_prompts, list), "sample_prompts must be a list of strings")
        caps = limits.current()
        for name, cap in (("steps", caps.max_finetune_steps), ("batch_size", caps.max_batch_size),
                          ("lora_r", caps.max_lora_r)):
            limits.check(getattr(self, name), cap, name)
        for name in ("eval_every", "sample_every", "save_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        need(self.seq_len is None or (isinstance(self.seq_len, int) and self.seq_len >= 2),
             f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        need(self.warmup_steps is None or 0 <= self.warmup_steps <= self.steps,
             f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        need(0 < self.peak_lr < 1, f"lr must be in (0, 1), got {self.peak_lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.lora_targets is None or (isinstance(self.lora_targets, list) and len(self.lora_targets) > 0),
             "lora_targets must be a non-empty list of module names (or None for all projections)")
        need(all(isinstance(p, str) and p.strip() for p in self.sample_prompts), "sample prompts must be non-empty")
        self._check_work_caps(caps)
        return self

    def _check_work_caps(self, caps: limits.Limits) -> None:
        """What one job costs besides its steps: sequence length, validation passes, sample prompts."""
        if self.seq_len is not None:
            limits.check(self.seq_len, caps.max_train_seq_len, "seq_len")
        if self.eval_every:
            limits.check(math.ceil(self.steps / self.eval_every), caps.max_train_evals,
                         "the number of validation passes (steps / eval_every)")
        limits.check(len(self.sample_prompts), caps.max_sample_prompts, "the number of sample prompts")
        for prompt in self.sample_prompts:
            limits.check(len(prompt), caps.max_sample_prompt_chars, "a sample prompt's length in characters")

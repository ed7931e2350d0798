"""ModelHandle: a loaded model, its tokenizer, and the execution paths that generate with it."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import budget, limits
from .generation import generate
from .budget import Deadline, TimeBudgetError
from .models.config import ModelConfig
from .errors import GenerationError
from .generation.generate import GenerationResult, Stream, run_generation
from .models import Family, LanguageModel, family
from .runners import PREPARABLE, Runner, offered
from .runners.eager import EagerRunner
from .generation.sampling import SamplingParams
from .formats.tokenizer import Tokenizer


@dataclass
class ModelHandle:
    model: LanguageModel | None  # Transformer, Encoder or LSTMLM; None for a handle that runs an exported graph only
    tokenizer: Tokenizer
    source: str
    load_seconds: float = 0.0
    runners: dict[str, Runner] = field(default_factory=dict)
    backend: str = "eager"
    eos_ids: set[int] = field(default_factory=set)
    config: ModelConfig | None = None
    generation_config: dict | None = None  # the folder's generation_config.json (sampling defaults), if any
    gguf_path: Path | None = None  # the GGUF file the model was loaded from, if it was (the native path reads it)

    def __post_init__(self):
        if self.model is not None:
            self.config = self.model.config
            own = getattr(self.model, "eager_runner", None)  # an encoder or an LSTM brings its own runner
            self.runners.setdefault("eager", own() if own else EagerRunner(self.model))
        self.backend = self.backend if self.backend in self.runners else next(iter(self.runners))
        self.eos_ids = set(self.eos_ids) | set(self.config.eos_token_ids) | self.tokenizer.end_of_turn_ids()
        self._lock = threading.Lock()  # one KV cache per model: generations take turns
        self.refused: dict[str, str] = {}  # PREPARABLE runners this model cannot have, and why (asked once)

    @property
    def family(self) -> Family:
        """What this model's family can do (chats, generates, fills masks, ...): ask it, not the family's name."""
        return family(self.config)

    def add_runner(self, name: str, runner: Runner) -> None:
        """Offer another execution path (e.g. an ONNX Runtime session of this model's export)."""
        with self._lock:
            self.runners[name] = runner

    def runner_names(self) -> list[str]:
        """Execution paths offered: the prepared ones, then those prepared on first use (compiled, triton)."""
        offered_here = [n for n in PREPARABLE if n not in self.refused and offered(n, self.gguf_path, self.family)]
        more = [n for n in offered_here if n not in self.runners] if self.model is not None else []
        return list(self.runners) + more

    def runner(self, name: str | None = None, progress=None) -> Runner:
        """The runner called `name` (default: the handle's backend), prepared now if it is one of PREPARABLE."""
        name = name or self.backend
        if name not in self.runners:
            if name not in PREPARABLE or self.model is None:
                raise GenerationError(f"no backend {name!r}; available: {', '.join(self.runner_names())}")
            if name in self.refused:
                raise GenerationError(self.refused[name])
            with self._lock:
                if name not in self.runners:
                    try:
                        self.runners[name] = PREPARABLE[name](self.model, progress, gguf=self.gguf_path)
                    except limits.LimitError:
                        raise  # a budget: another deployment (or a smaller request) may pass it
                    except GenerationError as e:  # this model cannot have it: not offered again, not built again
                        self.refused[name] = str(e)
                        raise
        return self.runners[name]

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_emb.weight.dtype if self.model is not None else torch.float32

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device if self.model is not None else torch.device("cpu")

    def info(self) -> dict:
        cfg = self.config
        n_params = sum(p.numel() for p in self.model.parameters()) if self.model is not None else cfg.n_params
        return dict(source=self.source, name=cfg.name, family=cfg.family, capabilities=self.family.capabilities(),
                    model_type=cfg.hf_model_type,
                    parameters=n_params, layers=cfg.n_layer, heads=cfg.n_head, kv_heads=cfg.n_kv_head,
                    d_model=cfg.d_model, vocab_size=cfg.vocab_size, context_length=cfg.max_seq_len,
                    dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                    weight_bytes=self.runners[self.backend].weight_bytes, load_seconds=round(self.load_seconds, 2),
                    chat_template="model" if self.chat_template else "fallback", runners=self.runner_names(),
                    prepared=list(self.runners), generation_config=self.generation_config)

    # --- prompts ---
    def encode(self, prompt_or_messages: str | list[dict] | list[int]) -> list[int]:
        """A raw prompt string, chat messages rendered with the model's chat template, or token ids as they are."""
        if isinstance(prompt_or_messages, str):
            ids = self.tokenizer.encode(prompt_or_messages)
        elif prompt_or_messages and all(isinstance(t, int) for t in prompt_or_messages):
            ids = list(prompt_or_messages)
            if max(ids) >= self.config.vocab_size or min(ids) < 0:
                raise GenerationError(f"token ids must be in [0, {self.config.vocab_size})")
        else:
            if not self.family.chats:
                raise GenerationError(f"{self.family.described} has no chat template and does not chat; "
                                      "give it plain text")
            ids = self.tokenizer.encode_chat(prompt_or_messages, add_generation_prompt=True)
        if not ids:
            raise GenerationError("the prompt is empty: write something for the model to continue")
        return ids

    # --- forward ---
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Full forward without cache: input_ids (B, T) -> logits (B, T, V): next-token logits for a causal model,
        masked-LM logits for an encoder (attention_mask (B, T): 1 on tokens, 0 on padding; encoders only)."""
        if input_ids.shape[-1] > self.config.max_seq_len:
            raise GenerationError(f"{input_ids.shape[-1]} tokens exceed the context of {self.config.max_seq_len}")
        rows, tokens = (1, input_ids.shape[-1]) if input_ids.dim() == 1 else input_ids.shape[:2]
        # masked-LM and causal logits are (B, T, V); a classifier's are (B, labels): its activations still count
        budget.check_forward(self.config, int(rows), int(tokens), self.dtype, what="this forward pass",
                             all_logits=self.config.labels is None)
        if self.family.bidirectional:
            return self.runners[self.backend].full_logits(input_ids, attention_mask).to(dtype)  # eager or onnx
        if attention_mask is not None:
            raise GenerationError("attention_mask is for encoders; a causal model's logits take unpadded ids")
        if self.model is None:
            with self._lock:
                return self.runners[self.backend].full_logits(input_ids).to(dtype)
        return self.model(input_ids.to(self.device)).to(dtype)  # no cache: needs no lock

    # --- generation ---
    def stream(self, prompt_or_messages: str | list[dict] | list[int], backend: str | None = None,
               should_stop=None, prefill_progress=None, deadline: Deadline | None = None, **params) -> Stream:
        """Stream text deltas (`Delta(index, text)`); `.result` holds the GenerationResult once exhausted.
        `should_stop()` is asked before each new token and between prompt chunks: when true the run ends there.
        `prefill_progress(done, total)` follows a long prompt's chunked prefill.

        `deadline` (budget.Deadline): once the run holds the model, passing it ends the run at the next step with
        finish_reason "time", keeping the text so far (see generate.run_generation). Passing it while still
        waiting for another generation to release the model raises TimeBudgetError (nothing was started)."""
        if not self.family.generates:
            raise GenerationError("this is an encoder (BERT-style): it fills masks, it does not generate text; "
                                  "use fill_mask or load a causal model")
        p = SamplingParams.from_kwargs(**params)
        prompt_ids = self.encode(prompt_or_messages)
        ctx = self.config.max_seq_len
        if len(prompt_ids) >= ctx:
            raise GenerationError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {ctx}")
        if len(prompt_ids) + p.max_new_tokens > ctx:
            raise GenerationError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds "
                                  f"the context of {ctx}; ask for at most {ctx - len(prompt_ids)} new tokens")
        runner = self.runner(backend)
        self.check_generation_memory(runner, p.num_samples, len(prompt_ids), p.max_new_tokens)

        def locked():
            self._acquire(deadline)
            try:
                return (yield from run_generation(runner, self.tokenizer, prompt_ids, p, self.eos_ids,
                                                  self.config.vocab_size, should_stop, prefill_progress, deadline))
            finally:
                self._lock.release()
        return Stream(locked())

    def check_generation_memory(self, runner: Runner, batch: int, prompt_len: int, max_new: int) -> None:
        """Refuse (budget.MemoryBudgetError) a generation whose KV cache + activations on `runner` would pass the
        memory budget, before `runner.start` allocates anything."""
        plan = getattr(runner, "memory_plan", None)
        plan = plan(prompt_len + max_new) if plan is not None else {}
        dtype = self.dtype if self.model is not None else "float32"
        budget.check_generation(self.config, batch, prompt_len, max_new, dtype, chunk=generate.PREFILL_CHUNK,
                                what="this generation", **plan)

    def _acquire(self, deadline: Deadline | None) -> None:
        """Take the model lock, waiting no longer than the deadline allows."""
        if deadline is None or deadline.at is None:
            self._lock.acquire()
        elif not self._lock.acquire(timeout=max(deadline.remaining(), 0.001)):
            raise TimeBudgetError(f"{deadline.what} waited for the model past this deployment's time limit of "
                                  f"{deadline.seconds:g} s (another generation was running)")

    def generate(self, prompt_or_messages: str | list[dict] | list[int], **params) -> GenerationResult:
        """Run `stream` to its end (same arguments, `deadline` included) and return the GenerationResult."""
        stream = self.stream(prompt_or_messages, **params)
        for _ in stream:
            pass
        return stream.result

    # --- encoders ---
    def fill_mask(self, text: str, top_k: int = 5, deadline=None) -> list[list[dict]]:
        """Each [MASK] of `text` -> its top_k tokens [{"token", "id", "prob"}] (encoders only); see fill_mask.py.
        `deadline` (budget.Deadline): checked before the forward."""
        from .generation.fill_mask import fill_mask

        return fill_mask(self, text, top_k, deadline=deadline)

    def pseudo_log_likelihood(self, text: str, deadline=None) -> dict:
        """Each token's log-probability with that token masked, and their sum (encoders only). `deadline`
        (budget.Deadline): checked between its forwards (one per 32 tokens)."""
        from .generation.fill_mask import pseudo_log_likelihood

        return pseudo_log_likelihood(self, text, deadline=deadline)

    def free(self):
        for runner in self.runners.values():
            runner.free()

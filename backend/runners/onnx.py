"""ONNX Runtime execution path: an exported graph behind the same Runner interface as eager.

This module owns the graph's input/output contract (`io_names`); export/ writes graphs to it.

Keys and values stay in ONNX Runtime's own memory between steps: each step's `present` outputs are bound
straight back as the next step's `past` inputs (IO binding), so the cache never round-trips through numpy.
The CUDA provider is asked for only where CUDA is really present, so CPU machines get no error spam.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..models.config import ModelConfig
from ..errors import GenerationError, ModelLoadError

MODEL_FILE = "model.onnx"
# optional input (default 0 = every position): with 1, a prompt's logits are its last position's only (export
# version 6 on; older graphs lack it and compute them all)
LOGITS_TO_KEEP = "logits_to_keep"


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graph's inputs and outputs, in order (optimum's names): input_ids (B, S), attention_mask (B, P+S),
    position_ids (B, S), past_key_values.{i}.key/value (B, nkv, P, hd) -> logits (B, S, V), present.{i}.key/value
    (B, nkv, P+S, hd); and the optional LOGITS_TO_KEEP, not listed. Fornax graphs before export version 5 with fused
    GroupQueryAttention have no position_ids."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


FP32_GQA_ON_CUDA = (
    "this ONNX graph's attention is fp32 GroupQueryAttention, which ONNX Runtime's CUDA provider implements for "
    "fp16 and bf16 only: on the GPU every attention node would fall back to the CPU, with each layer's keys and "
    "values copied across on every step. Running the whole graph on the CPU provider instead; for the GPU, use "
    "an fp16 export or one of the torch backends (eager, compiled, triton)")


def choose_providers(available: list[str], cuda: bool, attention: str | None = None,
                     dtype: str = "float32") -> tuple[list[str], str | None]:
    """The providers to ask for and, where CUDA is there but not used, the plain reason why (else None)."""
    if not (cuda and "CUDAExecutionProvider" in available):
        return ["CPUExecutionProvider"], None
    if attention == "GroupQueryAttention" and dtype == "float32":
        return ["CPUExecutionProvider"], FP32_GQA_ON_CUDA
    return ["CUDAExecutionProvider", "CPUExecutionProvider"], None


def providers(attention: str | None = None, dtype: str = "float32") -> list[str]:
    """ONNX Runtime's providers for a graph with this attention and float type, warning when CUDA goes unused."""
    import onnxruntime as ort

    chosen, reason = choose_providers(ort.get_available_providers(), torch.cuda.is_available(), attention, dtype)
    if reason:
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return chosen


def read_onnx_config(folder: Path) -> ModelConfig:
    """Our exact config from fornax.json, else the HF config.json written beside the graph."""
    try:
        if (folder / "fornax.json").exists():
            return ModelConfig.from_dict(json.loads((folder / "fornax.json").read_text())["config"])
        return ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    except (OSError, KeyError, ValueError) as e:
        raise ModelLoadError(f"{folder} has a model.onnx but no readable config.json / fornax.json: {e}") from e


def open_session(path: Path, threads: int | None = None, profile: str | None = None):
    """An ONNX Runtime session on `path` with all graph optimisations, `threads` intra-op threads, errors only;
    on the providers `providers` picks for the graph fornax.json describes. `profile`: ORT's profiler on, its
    trace written under this prefix (backend/bench/profile.py reads it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    try:
        chosen = providers(_attention(path.parent), _graph_dtype(path.parent))
        return ort.InferenceSession(str(path), opts, providers=chosen)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a loadable ONNX model: {str(e).strip()[:300]}") from e


def _attention(folder: Path) -> str | None:
    try:
        return json.loads((folder / "fornax.json").read_text()).get("attention")
    except (OSError, ValueError, AttributeError):
        return None


def _graph_dtype(folder: Path) -> str:
    """The graph's float type as fornax.json states it; Fornax exports are fp32 (the caches bound here are)."""
    try:
        return str(json.loads((folder / "fornax.json").read_text()).get("dtype", "float32"))
    except (OSError, ValueError, AttributeError):
        return "float32"


class OnnxRunner:
    def __init__(self, path: str | Path, config: ModelConfig, threads: int | None = None, name: str = "onnx",
                 profile: str | None = None):
        import onnxruntime as ort

        path = Path(path)
        self.path, self.config, self.name = path, config, name
        self.session = open_session(path, threads, profile)
        # where ORT keeps keys/values; logits always come back to the CPU, where sampling then runs
        self.ort_device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.device = torch.device("cpu")
        names = {i.name for i in self.session.get_inputs()}
        inputs, outputs = io_names(config.n_layer)
        self.past_names, self.present_names = inputs[3:], outputs[1:]
        # Graphs with fused GroupQueryAttention can update one preallocated K/V buffer in place (past and present
        # bound to the same memory); the generic graph concatenates. fornax.json says which graph this is; older
        # GQA graphs are the ones without position_ids.
        self.takes_positions = "position_ids" in names
        # a prompt's logits for its last position only (saves the output layer on every other one), where the graph
        # takes logits_to_keep (an input with a default: bound as an OrtValue, IO binding refuses it as an array)
        self.keeps_last = LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        self._keep_one = ort.OrtValue.ortvalue_from_numpy(np.ones(1, dtype=np.int64))  # holds its array
        self.shared_kv = not self.takes_positions or _attention(path.parent) == "GroupQueryAttention"
        missing = {"input_ids", "attention_mask", *self.past_names} - names
        if missing:
            raise ModelLoadError(f"{path.name} is not a Fornax/optimum causal-LM graph: it lacks inputs "
                                 f"{sorted(missing)[:3]}")
        # bytes read per decode step: the graph's weights less the fp32 embedding table, of which a step
        # gathers one row only
        file_bytes = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
        self.weight_bytes = max(file_bytes - config.vocab_size * config.d_model * 4, file_bytes // 2)
        self.batch, self.past, self.kv, self.kv_rows, self.io = 1, None, None, None, None

    def memory_plan(self, max_len: int) -> dict:
        """What a generation allocates here (budget.generation_parts): fp32 caches of max_len preallocated once
        (shared) or a new, longer pair per step beside the last (concatenating graphs), and every prompt
        position's logits in a graph without logits_to_keep."""
        return dict(cache_len=max_len, kv_dtype="float32", kv_copies=1 if self.shared_kv else 2,
                    all_prompt_logits=not self.keeps_last)

    def start(self, batch: int, max_len: int) -> None:
        import onnxruntime as ort

        self.batch, self.past = batch, None
        if self.shared_kv:  # allocated once per generation, written in place by every step
            cfg = self.config
            shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
            if self.ort_device == "cpu":  # numpy memory under the OrtValues: rows can be copied (_later_chunk)
                self.kv_rows = [np.empty(shape, np.float32) for _ in self.past_names]
                self.kv = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.kv_rows]
            else:
                self.kv_rows = None
                self.kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.ort_device)
                           for _ in self.past_names]
            # one binding for the whole generation: each step rebinds its three small inputs only (binding 2 x
            # n_layer caches per token was a measurable share of a small model's step)
            self.io = self._binding(self.kv)
            self.step_logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, cfg.vocab_size), np.float32)

    def _binding(self, kv: list):
        """An IO binding with the caches bound as both past and present (same memory: each run writes its keys in
        place) and, where the graph takes it, logits_to_keep = 1: every run here needs its last position only."""
        io = self.session.io_binding()
        if self.keeps_last:
            io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_one)
        for past, present, value in zip(self.past_names, self.present_names, kv):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        return io

    def _run(self, ids: np.ndarray, pos: int, past, last_only: bool = False) -> tuple[np.ndarray, list]:
        import onnxruntime as ort

        B, T = ids.shape
        cfg = self.config
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((B, pos + T), dtype=np.int64))
        if self.takes_positions:
            io.bind_cpu_input("position_ids", np.broadcast_to(np.arange(pos, pos + T, dtype=np.int64), (B, T)).copy())
        if last_only and self.keeps_last:
            io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_one)
        if past is None:
            empty = np.zeros((B, cfg.n_kv_head, 0, cfg.head_dim), dtype=np.float32)
            past = [ort.OrtValue.ortvalue_from_numpy(empty, self.ort_device)] * len(self.past_names)
        for name, value in zip(self.past_names, past):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.ort_device)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), out[1:]

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if self.shared_kv:
            logits = self._run_shared(ids.numpy(), pos)
        else:
            logits, self.past = self._run(ids.numpy(), pos, self.past if pos else None, last_only=True)
        return torch.from_numpy(logits[:, -1].copy())  # (B, V), not a view of a buffer the next step reuses

    def _run_shared(self, ids: np.ndarray, pos: int, io=None) -> np.ndarray:
        import onnxruntime as ort

        B, T = ids.shape
        if T > 1 and B > 1 and pos > 0 and io is None:
            return self._later_chunk(ids, pos)
        io = io or self.io
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((B, pos + T), dtype=np.int64))
        if self.takes_positions:
            io.bind_cpu_input("position_ids", np.broadcast_to(np.arange(pos, pos + T, dtype=np.int64), (B, T)).copy())
        if B == self.batch and (T == 1 or self.keeps_last):
            logits = self.step_logits
        else:  # a prompt's logits in a graph without logits_to_keep, or a one-row chunk
            logits = ort.OrtValue.ortvalue_from_shape_and_type((B, 1 if self.keeps_last else T,
                                                                 self.config.vocab_size), np.float32)
        io.bind_ortvalue_output("logits", logits)
        self.session.run_with_iobinding(io)
        return logits.numpy()

    def _later_chunk(self, ids: np.ndarray, pos: int) -> np.ndarray:
        """A prompt chunk after the first for several rows: GroupQueryAttention takes a multi-token input with a
        cache for one row only. The rows are the same prompt (several samples of it), so on the CPU the chunk runs
        once on row 0's cache and is copied to the others; elsewhere it goes in token by token."""
        if not (ids == ids[:1]).all():
            raise GenerationError("the ONNX runner continues a prompt in chunks only when every row is the same "
                                  "prompt")
        if self.kv_rows is None:
            for t in range(ids.shape[1]):
                logits = self._run_shared(ids[:, t:t + 1], pos + t)
            return logits
        import onnxruntime as ort

        T = ids.shape[1]
        first_row = self._binding([ort.OrtValue.ortvalue_from_numpy(a[:1]) for a in self.kv_rows])
        logits = self._run_shared(ids[:1], pos, first_row)
        for rows in self.kv_rows:
            rows[1:, :, pos:pos + T] = rows[:1, :, pos:pos + T]
        return np.repeat(logits, ids.shape[0], axis=0)

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """A full forward without cache: (B, T) -> (B, T, V)."""
        logits, _ = self._run(ids.numpy(), 0, None)
        return torch.from_numpy(logits)

    def free(self) -> None:
        self.past = self.kv = self.kv_rows = self.io = self.step_logits = None

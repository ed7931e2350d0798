"""The race's peers, one measurement per process: transformers eager fp32, llama.cpp (llama-cpp-python) and
onnxruntime-genai, each run under its own interpreter (llama.cpp and genai live in their own virtualenvs: genai
pulls the CPU `onnxruntime`, which must never meet the project's `onnxruntime-gpu`).

Self-contained on purpose: no Fornax imports, only the peer's own package and numpy. backend/bench/race.py runs it as
`PYTHON -I race_peers.py` (isolated: the repo's folders cannot shadow a peer's imports) with one JSON job on
standard input, and reads one JSON result from the last line of standard output:

  {"engine": "transformers" | "llama" | "genai" | "probe-...", "what": "time" | "logits", "source": PATH,
   "threads": N, "prompt_ids": [...], "new_tokens": N, "batch": B,   (what = "time")
   "ids": [...], "out": FILE.npy}                                      (what = "logits")

"time": greedy decoding of `new_tokens` tokens for `batch` copies of the prompt, EOS ignored, after a short
warm-up -> ttft_s, prefill_tok_s, decode_tok_s, weight_bytes, peak_rss_mb, tokens (one list per sequence).
"logits": the logits of every position of `ids` given the true tokens before it, saved as float32 (T, V) to `out`.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

WARMUP_TOKENS = 2


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def timing(P: int, B: int, t0: float, t_first: float, t_end: float, steps: int) -> dict:
    """Times of one greedy run: start, first token chosen, last token chosen; `steps` decode steps between."""
    decode_s = t_end - t_first
    return {"ttft_s": t_first - t0, "prefill_tok_s": P * B / (t_first - t0),
            "decode_tok_s": steps * B / decode_s if decode_s > 0 else 0.0}


# --- transformers: eager fp32 on the HF folder --------------------------------------------------------------------

def transformers_model(job):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    return AutoModelForCausalLM.from_pretrained(job["source"], dtype=torch.float32).eval()


def transformers_time(job) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # generate() hands it the prompt first, then each step's new tokens
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model = transformers_model(job)
    P, N, B = len(job["prompt_ids"]), job["new_tokens"], job["batch"]
    x = torch.tensor([job["prompt_ids"]] * B)                                   # (B, P)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(x))
    with torch.inference_mode():
        model.generate(x, max_new_tokens=WARMUP_TOKENS, min_new_tokens=WARMUP_TOKENS, **kwargs)
        clock = Clock()
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=N, min_new_tokens=N, streamer=clock, **kwargs)
    new = clock.times[1:]  # times[0]: the prompt, put before any forward pass
    return {**timing(P, B, t0, new[0], new[-1], len(new) - 1), "tokens": out[:, P:].tolist(),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def transformers_logits(job) -> np.ndarray:
    import torch

    model = transformers_model(job)
    with torch.inference_mode():
        return model(torch.tensor([job["ids"]])).logits[0].float().numpy()      # (T, V)


# --- llama.cpp through llama-cpp-python's C API ----------------------------------------------------------------------

class LlamaCpp:
    """One model and one context with room for `batch` sequences; `decode` runs one llama_batch."""

    def __init__(self, path: str, threads: int, batch: int, length: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        per_seq = -(-length // 256) * 256
        cp.n_ctx = per_seq * batch          # split evenly between the sequences
        cp.n_batch = cp.n_ubatch = max(512, length * batch)
        cp.n_seq_max = batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, 0, batch)

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, whether its logits are wanted)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, want
            b.seq_id[i][0] = seq
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, i: int) -> np.ndarray:
        """Logits of the batch's i-th entry (V,) (a view: copy it before the next decode)."""
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def greedy(self, prompt: list[int], new_tokens: int, batch: int) -> tuple[list[list[int]], list[float]]:
        """`batch` copies of the prompt decoded together, one sequence id each -> tokens, [t0, t_first, t_end]."""
        self.clear()
        P = len(prompt)
        t0 = time.perf_counter()
        self.decode([(tok, pos, s, pos == P - 1) for s in range(batch) for pos, tok in enumerate(prompt)])
        chosen = [int(self.logits(s * P + P - 1).argmax()) for s in range(batch)]
        t_first = time.perf_counter()
        tokens = [[c] for c in chosen]
        for step in range(1, new_tokens):
            self.decode([(chosen[s], P + step - 1, s, True) for s in range(batch)])
            chosen = [int(self.logits(s).argmax()) for s in range(batch)]
            for s in range(batch):
                tokens[s].append(chosen[s])
        return tokens, [t0, t_first, time.perf_counter()]


def llama_time(job) -> dict:
    P, N, B = len(job["prompt_ids"]), job["new_tokens"], job["batch"]
    llm = LlamaCpp(job["source"], job["threads"], B, P + N)
    llm.greedy(job["prompt_ids"], WARMUP_TOKENS, B)
    tokens, (t0, t_first, t_end) = llm.greedy(job["prompt_ids"], N, B)
    return {**timing(P, B, t0, t_first, t_end, N - 1), "tokens": tokens,
            "weight_bytes": os.path.getsize(job["source"])}


def llama_logits(job) -> np.ndarray:
    """Every position's logits from one batch (each entry flagged for output: what `logits_all=True` does)."""
    ids = job["ids"]
    llm = LlamaCpp(job["source"], job["threads"], 1, len(ids))
    llm.decode([(tok, pos, 0, True) for pos, tok in enumerate(ids)])
    return np.stack([llm.logits(i).copy() for i in range(len(ids))])          # (T, V)


# --- onnxruntime-genai: its own int4 CPU model (threads set in its genai_config.json) ------------------------------

def genai_generator(job, length: int, batch: int):
    import onnxruntime_genai as og

    model = og.Model(job["source"])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, do_sample=False, batch_size=batch)
    return og.Generator(model, params)


def genai_greedy(job, prompt: list[int], new_tokens: int, batch: int):
    gen = genai_generator(job, len(prompt) + new_tokens, batch)
    t0 = time.perf_counter()
    gen.append_tokens(np.array([prompt] * batch, dtype=np.int32))   # the prompt's forward pass
    gen.generate_next_token()                                       # the first pick, from the prompt's logits
    t_first = time.perf_counter()
    steps = [gen.get_next_tokens().tolist()]
    for _ in range(new_tokens - 1):
        gen.generate_next_token()                                   # one decode step, then the pick
        steps.append(gen.get_next_tokens().tolist())
    return [list(row) for row in zip(*steps)], [t0, t_first, time.perf_counter()]


def genai_time(job) -> dict:
    P, N, B = len(job["prompt_ids"]), job["new_tokens"], job["batch"]
    genai_greedy(job, job["prompt_ids"], WARMUP_TOKENS, B)
    tokens, (t0, t_first, t_end) = genai_greedy(job, job["prompt_ids"], N, B)
    folder = job["source"]
    weight_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                       if f.startswith("model.onnx"))
    return {**timing(P, B, t0, t_first, t_end, N - 1), "tokens": tokens, "weight_bytes": weight_bytes}


def genai_logits(job) -> np.ndarray:
    """Teacher-forced one token at a time: each append runs the model on the true token; get_logits is its output."""
    ids = job["ids"]
    gen = genai_generator(job, len(ids) + 1, 1)
    rows = []
    for tok in ids:
        gen.append_tokens(np.array([[tok]], dtype=np.int32))
        logits = gen.get_logits()                                              # (1, 1, V)
        rows.append(logits.reshape(-1, logits.shape[-1])[-1].copy())
    return np.stack(rows)                                                      # (T, V)


ENGINES = {"transformers": (transformers_time, transformers_logits, "transformers"),
           "llama": (llama_time, llama_logits, "llama_cpp"),
           "genai": (genai_time, genai_logits, "onnxruntime_genai")}


def main() -> None:
    job = json.loads(sys.stdin.read())
    engine = job["engine"]
    if engine.startswith("probe-"):  # is the peer's package importable here? -> its version
        import importlib

        module = importlib.import_module(ENGINES[engine.removeprefix("probe-")][2])
        print(json.dumps({"version": getattr(module, "__version__", "?")}))
        return
    time_fn, logits_fn, _ = ENGINES[engine]
    if job["what"] == "time":
        result = time_fn(job)
    else:
        np.save(job["out"], logits_fn(job).astype(np.float32))
        result = {"out": job["out"]}
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

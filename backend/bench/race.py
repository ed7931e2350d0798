"""The race: every Fornax execution path and the peers on the same prompt token ids, one harness.

    python -m backend race [--model default] [--onnx DIR]... [--llama-python PY] [--genai-python PY] [--threads 2]
                           [--repeats 3] [--configs 128+128,512+256] [--batches 1,4]
                           [--paths eager,compiled,onnx,...] [--text FILE] [--csv F] [--png F] [--quick]

Paths: Fornax eager and compiled; each ONNX export given by --onnx (its precision read from the folder's
fornax.json); triton and compiled+triton where CUDA is present. Peers, when installed: transformers eager fp32 (on
the HF folder Fornax's GGUF conversion writes), llama.cpp (llama-cpp-python) on the GGUF file itself, and
onnxruntime-genai on its own int4 CPU model (built once from that HF folder, cached). The peers run
backend/bench/race_peers.py under their own virtualenvs' interpreters; a peer that is missing gets a row that says so.

The prompt is tokenized once by Fornax and every path gets those ids. Configurations 128+128 and 512+256, batch 1
and 4 (batch 4 = the same prompt as four sequences decoded together: Fornax's engine batches the samples of one
prompt, so every engine does the same work), greedy, EOS ignored, threads pinned. Every measurement runs in its own
process (clean peak RSS); repeats go round-robin over the paths; the table shows medians.

Per path: TTFT, prefill and decode tok/s, peak RSS, weight GB/s achieved while decoding and its percentage of the
machine's read bandwidth (the floor: weight bytes read per decode step / bandwidth), fidelity against eager fp32
(teacher-forced on held-out text: top-1 agreement and mean KL), greedy tokens until the first divergence from eager,
and decode / prefill ratios to every peer.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..disk.atomic import atomic_folder
from .common import bench_text, memory_read_gb_s, peak_rss_mb, run_child
from ..disk.caches import cache_root
from ..errors import FornaxError
from ..loading import default_gguf_path, load, resolve
from .race_report import print_table, rows_of, write_csv, write_png
from ..scoring.agreement import agreement_sums, summarize

CONFIGS = ((128, 128), (512, 256))        # (prompt tokens, new tokens)
QUICK_CONFIGS = ((32, 16),)
BATCHES = (1, 4)
FIDELITY_TOKENS = 257                     # 256 scored predictions
QUICK_FIDELITY_TOKENS = 65
PEERS_SCRIPT = Path(__file__).with_name("race_peers.py")
PEER_PACKAGES = {"transformers": "transformers", "llama": "llama-cpp-python", "genai": "onnxruntime-genai"}


class RaceError(FornaxError):
    """The race cannot start as asked (bad paths, a missing export folder, an unreadable text file)."""


@dataclass
class RacePath:
    key: str              # what --paths selects: eager, compiled, onnx-int4, triton, ..., llama.cpp, genai
    label: str
    engine: str           # fornax | transformers | llama | genai
    source: str           # a model source, an export folder, an HF folder, a GGUF file or a genai model folder
    precision: str
    backend: str = ""     # Fornax's runner
    python: str = ""      # a peer's interpreter
    device: str = "cpu"
    status: str = ""      # "" = it runs; else why not (its rows say so)
    runs: dict = field(default_factory=dict)       # (P, N, B) -> [child results]
    fidelity: dict = field(default_factory=dict)


def held_out_text(path: str | None = None) -> str:
    """The fidelity text: a file, or pydoc's help on the execution model (shipped with Python; export/verify.py's
    fixed text is another topic)."""
    if path:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RaceError(f"cannot read the text file {path}: {e}") from e
    from pydoc_data.topics import topics

    return topics["execmodel"]


def fidelity(teacher: torch.Tensor, got: torch.Tensor, ids: list[int]) -> dict:
    """KL(teacher || got) and top-1 agreement over the positions predicting ids[1:]; teacher, got (T, V)."""
    V = min(teacher.shape[-1], got.shape[-1])
    sums = agreement_sums(teacher[:-1, :V], got[:-1, :V], torch.tensor(ids[1:]))
    s = summarize(sums)
    return {"top1_agreement": s["top1_agreement"], "mean_kl": s["mean_kl"], "positions": s["tokens"]}


@torch.inference_mode()
def teacher_forced_logits(runner, ids: list[int]) -> np.ndarray:
    """A runner's logits for every position of ids, one cached decode step per true token: (T, V). Decode steps,
    because they are the code the race times (a compiled runner's full forward would be plain eager)."""
    runner.start(1, len(ids))
    rows = [runner.forward(torch.tensor([[tok]]), pos)[0] for pos, tok in enumerate(ids)]   # T x (V,)
    runner.free()
    return torch.stack(rows).float().cpu().numpy()


def fornax_job(job: dict) -> dict:
    """One measurement of a Fornax path, in this (child) process; job as in race_peers.py, plus backend, device."""
    torch.set_num_threads(job["threads"])
    handle = load(job["source"], dtype="float32", device=job.get("device", "cpu"))
    backend = job["backend"]
    if job["what"] == "logits":
        np.save(job["out"], teacher_forced_logits(handle.runner(backend), job["ids"]))
        return {"out": job["out"], "peak_rss_mb": peak_rss_mb()}
    ids, N, B = job["prompt_ids"], job["new_tokens"], job["batch"]
    params = dict(backend=backend, temperature=0, ignore_eos=True, num_samples=B)
    handle.generate(ids, max_new_tokens=2, **params)  # warm-up on the same shapes (a compiled path compiles here)
    result = handle.generate(ids, max_new_tokens=N, **params)
    t = result.timings
    return {"ttft_s": t.ttft_s, "prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s,
            "weight_bytes": t.weight_bytes, "tokens": [c.token_ids for c in result.completions],
            "peak_rss_mb": peak_rss_mb()}


def cuda_read_gb_s() -> float:
    """The GPU's streaming read bandwidth: the floor for the CUDA paths."""
    x = torch.ones(1024**3 // 4, device="cuda")  # 1 GB
    x.sum()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x.sum()
    torch.cuda.synchronize()
    return 10 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def peer_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def run_peer(python: str, job: dict) -> tuple[dict | None, str]:
    """race_peers.py under `python`, isolated (-I) and outside the repo so its folders shadow no peer import."""
    with tempfile.TemporaryDirectory() as work:
        try:
            done = subprocess.run([python, "-I", str(PEERS_SCRIPT)], input=json.dumps(job), capture_output=True,
                                  text=True, cwd=work, env=peer_env(job.get("threads", 1)))
        except OSError as e:
            return None, str(e)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def measure(path: RacePath, job: dict, isolate: bool = True) -> tuple[dict | None, str]:
    job = {**job, "source": path.source, "engine": path.engine, "backend": path.backend, "device": path.device}
    if path.engine != "fornax":
        return run_peer(path.python, job)
    if not isolate:
        return fornax_job(job), ""
    result = run_child("backend.bench.race:fornax_job", [job], job["threads"])
    return result, "" if result is not None else "failed (see the error above)"


# --- which paths ---------------------------------------------------------------------------------------------------

def onnx_path(folder: str) -> RacePath:
    folder_path = Path(folder)
    if not (folder_path / "model.onnx").exists():
        raise RaceError(f"--onnx {folder}: no model.onnx there (make one with `python -m export --model M --out "
                        f"{folder}`)")
    meta = {}
    for name in ("fornax.json", "parity.json"):
        try:
            meta.update(json.loads((folder_path / name).read_text()))
        except (OSError, ValueError):
            pass
    quant = meta.get("quant", "none")
    precision = "fp32" if quant in ("none", None) else str(quant)
    method = str(meta.get("quant_method") or "")   # how export/ quantized: the GGUF's own blocks, or its quantizer
    detail = "GGUF blocks" if method.startswith("GGUF blocks") else method.rsplit(", ", 1)[-1] if method else ""
    return RacePath(f"onnx-{precision}", f"onnx {precision}", "fornax", str(folder_path),
                    f"{precision} {detail}".strip(), backend="onnx")


def gguf_file(model: str) -> Path | None:
    """The GGUF file a model source comes from, if it is one (llama.cpp runs the file itself)."""
    if model == "default":
        return default_gguf_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def probe(python: str | None, engine: str, flag: str) -> str:
    """'' when the peer's package imports under `python`; else the row's status."""
    if not python:
        return f"not installed (pass {flag} PYTHON: a virtualenv with {PEER_PACKAGES[engine]})"
    if not Path(python).exists():
        return f"not installed ({python} does not exist)"
    result, error = run_peer(python, {"engine": f"probe-{engine}", "threads": 1})
    return "" if result is not None else f"not installed ({PEER_PACKAGES[engine]} does not import under {python})"


def race_paths(model: str, onnx: list[str] = (), llama_python: str | None = None,
               genai_python: str | None = None, select: list[str] | None = None) -> list[RacePath]:
    """Every path of the race, each with its status; `select` keeps the keys named (and their prefixes: "onnx"
    keeps every export). Eager always runs: it is the reference for fidelity and greedy divergence."""
    gguf = gguf_file(model)
    paths = [RacePath("eager", "fornax eager", "fornax", model, "fp32", backend="eager"),
             RacePath("compiled", "fornax compiled", "fornax", model, "fp32", backend="compiled"),
             RacePath("native", "fornax native", "fornax", model, gguf_precision(gguf), backend="native",
                      status=native_status(gguf))]
    for folder in onnx:
        p = onnx_path(folder)
        if any(q.key == p.key for q in paths):  # two exports of one precision: the folder names tell them apart
            p.key, p.label = f"{p.key}-{Path(folder).name}", f"{p.label} ({Path(folder).name})"
        paths.append(p)
    cuda = torch.cuda.is_available()
    for key, backend in (("eager-cuda", "eager"), ("compiled-cuda", "compiled"), ("triton", "triton"),
                         ("compiled+triton", "compiled+triton")):
        paths.append(RacePath(key, f"fornax {key}", "fornax", model, "fp32", backend=backend, device="cuda",
                              status="" if cuda else "no CUDA GPU here"))
    folder = str(resolve(model))
    paths.append(RacePath("transformers", "transformers eager", "transformers", folder, "fp32",
                          python=sys.executable))
    paths.append(RacePath("llama.cpp", "llama.cpp", "llama", str(gguf or ""), gguf_precision(gguf),
                          python=llama_python or ""))
    paths.append(RacePath("genai", "onnxruntime-genai", "genai", folder, "int4", python=genai_python or ""))
    if select:
        known = {p.key for p in paths} | {"onnx"}
        unknown = [s for s in select if s not in known]
        if unknown:
            raise RaceError(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        paths = [p for p in paths if p.key == "eager" or any(p.key == s or p.key.startswith(s + "-") for s in select)]
    for p in paths:
        if p.status:
            continue
        if p.engine == "transformers":
            p.status = probe(p.python, "transformers", "(the project's interpreter)")
        elif p.engine == "llama":
            p.status = "no GGUF file for this model" if gguf is None else probe(p.python, "llama", "--llama-python")
        elif p.engine == "genai":
            p.status = probe(p.python, "genai", "--genai-python")
    return paths


def native_status(gguf: Path | None) -> str:
    """Why the native CPU path cannot race here ("" when it can: its blocks are checked when it is prepared)."""
    if gguf is None:
        return "no GGUF file for this model"
    from ..runners.native import compiler_present

    return "" if compiler_present() else "no C compiler here to build it"


def gguf_precision(path: Path | None) -> str:
    if path is None:
        return ""
    stem = path.stem.rsplit(".", 1)[-1]
    return f"gguf {stem}" if stem.upper().startswith(("Q", "F", "BF", "IQ")) else "gguf"


def genai_model(hf_folder: str, python: str, threads: int) -> Path:
    """onnxruntime-genai's own int4 CPU model of the HF folder, built once by its builder (cached by the folder's
    content), with `threads` written into its genai_config.json."""
    folder = Path(hf_folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    out = cache_root() / "peers" / f"genai-int4-cpu-{h.hexdigest()[:20]}"
    if not (out / "genai_config.json").exists():
        print("[race] building onnxruntime-genai's int4 CPU model (once; cached)", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(out) as tmp, tempfile.TemporaryDirectory() as work:
            done = subprocess.run([python, "-I", "-m", "onnxruntime_genai.models.builder", "-m", str(folder), "-i",
                                   str(folder), "-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", f"{work}/cache"],
                                  capture_output=True, text=True, cwd=work, env=peer_env(threads))
            if done.returncode != 0:
                raise RaceError("onnxruntime-genai's builder failed: " + done.stderr.strip()[-300:])
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=4))
    return out


# --- the race -------------------------------------------------------------------------------------------------------

def run_race(model: str = "default", paths: list[RacePath] | None = None, threads: int = 2, repeats: int = 3,
             configs=CONFIGS, batches=BATCHES, fidelity_tokens: int = FIDELITY_TOKENS, text: str | None = None,
             csv_path: str | None = None, png_path: str | None = None, isolate: bool = True) -> list[dict]:
    """Race `paths` (default: race_paths(model)) and return one row per path x configuration x batch."""
    paths = paths if paths is not None else race_paths(model)
    floor = memory_read_gb_s(threads)
    print(f"[race] memory read {floor:.1f} GB/s with {threads} threads; greedy; each measurement in its own process",
          file=sys.stderr)
    for p in paths:
        if p.status:
            print(f"[race] {p.label}: {p.status}", file=sys.stderr)

    # the reference: eager fp32 in this process, for the prompt ids, the teacher logits and the greedy tokens
    torch.set_num_threads(threads)
    handle = load(model, dtype="float32", device="cpu")
    prompt_text = handle.tokenizer.encode(bench_text(), add_special_tokens=False)
    held_out = handle.tokenizer.encode(held_out_text(text), add_special_tokens=False)
    held_out = held_out[:min(fidelity_tokens, handle.config.max_seq_len)]
    if len(held_out) < 2:
        raise RaceError("the fidelity text is shorter than two tokens")
    longest = max(P for P, _ in configs)
    if len(prompt_text) < longest:
        raise RaceError(f"the benchmark text has {len(prompt_text)} tokens, fewer than the {longest}-token prompt")
    with torch.inference_mode():
        teacher = handle.model(torch.tensor([held_out]))[0].float()           # (T, V)
        reference = {(P, N): handle.generate(prompt_text[:P], max_new_tokens=N, temperature=0,
                                             ignore_eos=True).completions[0].token_ids for P, N in configs}
    del handle

    live = [p for p in paths if not p.status]
    for p in live:
        if p.engine == "genai":
            try:
                p.source = str(genai_model(p.source, p.python, threads))
            except (RaceError, OSError, KeyError, ValueError) as e:
                p.status = f"failed: {e}"
    live = [p for p in live if not p.status]
    with tempfile.TemporaryDirectory() as work:
        for p in live:
            out = str(Path(work) / f"{p.key}.npy")
            result, error = measure(p, {"what": "logits", "ids": held_out, "out": out, "threads": threads}, isolate)
            if result is None:
                p.status = f"failed: {error}"
                continue
            p.fidelity = fidelity(teacher, torch.from_numpy(np.load(out)), held_out)
            print(f"[race] {p.label}: top-1 {p.fidelity['top1_agreement']:.3f}, KL {p.fidelity['mean_kl']:.2e}",
                  file=sys.stderr)
    live = [p for p in live if not p.status]
    for r in range(repeats):  # round-robin: every path once per configuration before the next repeat
        for P, N in configs:
            for B in batches:
                job = {"what": "time", "prompt_ids": prompt_text[:P], "new_tokens": N, "batch": B,
                       "threads": threads}
                for p in live:
                    if p.status:  # failed earlier: its rows say why
                        continue
                    result, error = measure(p, job, isolate)
                    if result is None:
                        p.runs.setdefault((P, N, B), [])
                        p.status = p.status or f"failed: {error}"
                        continue
                    p.runs.setdefault((P, N, B), []).append(result)
                    print(f"[race] {r + 1}/{repeats} {P}+{N} x{B} {p.label}: decode {result['decode_tok_s']:.1f} "
                          f"tok/s", file=sys.stderr)

    meta = dict(model=model, threads=threads, repeats=repeats, read_gb_s=floor, date=str(datetime.date.today()),
                torch=torch.__version__)
    if any(p.device == "cuda" for p in live):
        meta["cuda_read_gb_s"] = cuda_read_gb_s()
    rows = rows_of(paths, configs, batches, reference, meta)
    print_table(rows)
    if csv_path:
        write_csv(csv_path, rows)
    if png_path:
        write_png(png_path, rows)
    return rows

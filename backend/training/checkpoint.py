"""Checkpoints, written atomically and read back without unpickling anything.

    OUT/checkpoint-000120/
        weights.safetensors   the trainable parameters by name (LoRA: the adapters only; full/pretrain: all)
        trainer.pt            optimizer and scheduler state, step, RNG states as tensors (torch.load weights_only=True)
        meta.json             the TrainConfig, the data file's fingerprint and the run's history so far
        tokenizer.json, tokenizer_config.json, model_config.json   (pretrain: the trained tokenizer and architecture)

Each checkpoint is written into a hidden temporary folder and renamed to its final name only once complete, so a
write that dies midway leaves the previous checkpoint as the newest one. The newest KEEP are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..disk.atomic import atomic_folder
from ..errors import TrainError

PREFIX = "checkpoint-"
KEEP = 2
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary sibling and rename it over `path`: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False))
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the data (a power cut would leave nothing)
    os.replace(tmp, path)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out` as (step, folder), oldest first."""
    if not Path(out).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(out).iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def save_checkpoint(out: Path, step: int, weights: dict[str, torch.Tensor], trainer: dict, meta: dict,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint-<step> into `out` atomically and drop all but the newest KEEP checkpoints."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{PREFIX}{step:06d}"
    if final.exists():  # this step is already saved (e.g. cancelled right after a periodic save)
        return final
    for stale in out.glob(f".{PREFIX}*.tmp-*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_folder(final) as tmp:  # on disk (fsync) before the rename makes the checkpoint visible
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        if extra is not None:
            extra(tmp)
    for _, old in list_checkpoints(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, trainer state, meta) of one checkpoint folder."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path / "weights.safetensors"))
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)  # never unpickle code
        meta = json.loads((path / "meta.json").read_text())
    except Exception as e:
        raise TrainError(f"checkpoint {path} is unreadable: {e}") from e
    check_meta(meta, path)
    return weights, trainer, meta


META_TYPES = {"config": dict, "step": int, "global_batch": int, "data_sha256": str, "history": dict}
HISTORY_TYPES = {"train_loss": list, "val_loss": list, "samples": list, "metrics": dict}


def check_meta(meta, path: Path, complete: bool = False) -> None:
    """A checkpoint's meta.json holds only the keys save_checkpoint writes (all of them when `complete`), each of
    its type: resume copies its history into the job's live state, so a crafted one must not set anything else
    (status, out_dir, ...)."""
    where = f"checkpoint {path}: meta.json"
    if not isinstance(meta, dict):
        raise TrainError(f"{where} is not a JSON object")
    for keys, types, what in ((meta.keys(), META_TYPES, ""), (meta.get("history", {}).keys() if isinstance(
            meta.get("history"), dict) else [], HISTORY_TYPES, "history.")):
        unknown = sorted(set(keys) - set(types))
        if unknown:
            raise TrainError(f"{where} has unknown key(s) {', '.join(what + k for k in unknown)}")
    for name, kind in META_TYPES.items():
        if name not in meta and not complete:
            continue
        v = meta.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise TrainError(f"{where} lacks {name!r} or it is not a {kind.__name__}")
    for name, kind in HISTORY_TYPES.items():
        if name in meta.get("history", {}) and not isinstance(meta["history"][name], kind):
            raise TrainError(f"{where}: history.{name} is not a {kind.__name__}")


def rng_state() -> dict[str, torch.Tensor]:
    """Every random number generator the loop can touch, as plain tensors."""
    version, words, _ = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor([version, *words], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))

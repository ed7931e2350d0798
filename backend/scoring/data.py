"""Evaluation data: read and check a file before any model runs, and fingerprint it for the history.

- Texts for perplexity / agreement: a `.txt` file (one text) or JSONL of `{"text": ...}` (one text per line).
- Generation sets: JSONL of `{"prompt": str, "reference": str | [str, ...]}` or `{"messages": [...], "reference"}`.
- Labelled sets for classification: JSONL `{"text", "label"}` or CSV `text,label`, read by the training reader
  (backend/training/data.py) so a file that finetunes also evaluates.

Every problem (missing, too large, empty, not UTF-8, a malformed line) raises ScoringError naming file and line."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .. import limits
from ..errors import FornaxError, ScoringError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def read_utf8(path: str | Path) -> tuple[Path, str, str]:
    """(path, text, sha256 of the bytes) of a UTF-8 file, its size capped before it is read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScoringError(f"no data file at {path}" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    try:
        limits.check(size, limits.current().max_upload_bytes, f"the size of {path.name} in bytes")
    except FornaxError as e:
        raise ScoringError(str(e)) from e
    raw = path.read_bytes()
    if not raw.strip():
        raise ScoringError(f"{path.name} is empty: there is nothing to evaluate")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ScoringError(f"{path.name} looks like a binary file (a NUL byte at offset {nul}), not UTF-8 text")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ScoringError(f"{path.name} is not UTF-8 text (an invalid byte at offset {e.start})") from e
    return path, text, hashlib.sha256(raw).hexdigest()


def _jsonl_objects(path: Path, text: str) -> list[tuple[int, dict]]:
    objects = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may stand raw inside a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScoringError(f"{path.name} line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise ScoringError(f"{path.name} line {lineno} is not a JSON object")
        objects.append((lineno, obj))
    if not objects:
        raise ScoringError(f"{path.name} has no JSON lines: there is nothing to evaluate")
    return objects


@dataclass
class TextSet:
    path: Path
    fingerprint: str
    texts: list[str]
    names: list[str]             # "notes.txt" or "data.jsonl line 3", for errors


def read_texts(path: str | Path) -> TextSet:
    path, text, digest = read_utf8(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return TextSet(path, digest, [text], [path.name])
    texts, names = [], []
    for lineno, obj in _jsonl_objects(path, text):
        if not isinstance(obj.get("text"), str):
            raise ScoringError(f"{path.name} line {lineno} has no 'text' string")
        texts.append(obj["text"])
        names.append(f"{path.name} line {lineno}")
    return TextSet(path, digest, texts, names)


@dataclass
class GenerationSet:
    path: Path
    fingerprint: str
    prompts: list                # str or chat messages
    references: list             # str or list of str


def read_generation_set(path: str | Path) -> GenerationSet:
    path, text, digest = read_utf8(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise ScoringError(f"{path.name}: generation data is JSONL with 'prompt' (or 'messages') and 'reference' "
                           f"on every line")
    prompts, references = [], []
    for lineno, obj in _jsonl_objects(path, text):
        where = f"{path.name} line {lineno}"
        if isinstance(obj.get("prompt"), str) and obj["prompt"]:
            prompts.append(obj["prompt"])
        elif isinstance(obj.get("messages"), list) and obj["messages"]:
            for i, m in enumerate(obj["messages"]):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise ScoringError(f"{where}: message {i + 1} must be {{'role': str, 'content': str}}")
            prompts.append([{"role": m["role"], "content": m["content"]} for m in obj["messages"]])
        else:
            raise ScoringError(f"{where} has neither a non-empty 'prompt' string nor a 'messages' list")
        ref = obj.get("reference")
        if isinstance(ref, str):
            references.append(ref)
        elif isinstance(ref, list) and ref and all(isinstance(r, str) for r in ref):
            references.append(list(ref))
        else:
            raise ScoringError(f"{where} has no 'reference' (a string, or a non-empty list of strings)")
    counts = {1 if isinstance(r, str) else len(r) for r in references}
    if len(counts) > 1:
        raise ScoringError(f"{path.name}: every line needs the same number of references; found {sorted(counts)}")
    return GenerationSet(path, digest, prompts, references)


@dataclass
class LabelledSet:
    path: Path
    fingerprint: str
    texts: list[str]
    labels: list[str]            # gold label per text
    label_names: list[str]       # the label set, sorted


def read_labelled_set(path: str | Path) -> LabelledSet:
    from ..training.data import read_records

    path, _, digest = read_utf8(path)             # our checks and size cap first, then the training reader's
    try:
        records = read_records(path, task="classify")
    except FornaxError as e:
        raise ScoringError(str(e)) from e
    return LabelledSet(path, digest, [t for t, _ in records.items], [label for _, label in records.items],
                       records.labels)

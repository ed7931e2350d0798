"""Evaluation data: read and check a file before any model runs, and fingerprint it for the history.

- Texts for perplexity / agreement: a `.txt` file (one text) or JSONL of `{"text": ...}` (one text per line).
- Generation sets: JSONL of `{"prompt": str, "reference": str | [str, ...]}` or `{"messages": [...], "reference"}`.
- Labelled sets for classification: JSONL `{"text", "label"}` or CSV `text,label`, read by the training-format
  reader (backend/data/records.py) so a file that finetunes also evaluates.

The file checks and streaming parsers are backend/data/files.py's. Every problem (missing, too large, empty, not
UTF-8, a malformed line) raises a ScoringError (the readers' DataError is one) naming file and line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import limits
from ..data.files import JSONL_SUFFIXES, RowCaps, check_message_shapes, deployment, jsonl_objects, read_text, scan_utf8
from ..data.records import read_records
from ..errors import FornaxError, ScoringError


def checked_file(path: str | Path) -> tuple[Path, str]:
    """(path, sha256 of the bytes) of a UTF-8 file, its size capped before it is read, then checked chunk by chunk
    (nothing of it is held: the readers below stream it line by line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScoringError(f"no data file at {path}" if not path.exists() else f"{path} is not a file")
    try:
        limits.check(path.stat().st_size, limits.current().max_upload_bytes, f"the size of {path.name} in bytes")
    except FornaxError as e:
        raise ScoringError(str(e)) from e
    return path, scan_utf8(path, "evaluate")


def row_caps(path: Path) -> RowCaps:
    """An evaluation's caps on one file while it is read: rows, and characters of one text."""
    caps = limits.current()
    return RowCaps(path, caps.max_eval_rows, caps.max_eval_chars)


def _jsonl_objects(path: Path, caps: RowCaps):
    yield from jsonl_objects(path, caps)
    if not caps.rows:
        raise ScoringError(f"{path.name} has no JSON lines: there is nothing to evaluate")


@dataclass
class TextSet:
    path: Path
    fingerprint: str
    texts: list[str]
    names: list[str]             # "notes.txt" or "data.jsonl line 3", for errors


def read_texts(path: str | Path) -> TextSet:
    path, digest = checked_file(path)
    caps = row_caps(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        if caps.max_chars is not None and path.stat().st_size > 4 * caps.max_chars:  # surely too long: unread
            raise ScoringError(f"{path.name} is {path.stat().st_size:,} bytes, more than the {caps.max_chars:,} "
                               f"characters per text this {deployment()} deployment allows")
        return TextSet(path, digest, [caps.text(read_text(path), path.name)], [path.name])
    texts, names = [], []
    for lineno, obj in _jsonl_objects(path, caps):
        if not isinstance(obj.get("text"), str):
            raise ScoringError(f"{path.name} line {lineno} has no 'text' string")
        texts.append(caps.text(obj["text"], f"{path.name} line {lineno}"))
        names.append(f"{path.name} line {lineno}")
    return TextSet(path, digest, texts, names)


@dataclass
class GenerationSet:
    path: Path
    fingerprint: str
    prompts: list                # str or chat messages
    references: list             # str or list of str


def read_generation_set(path: str | Path) -> GenerationSet:
    path, digest = checked_file(path)
    caps = row_caps(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise ScoringError(f"{path.name}: generation data is JSONL with 'prompt' (or 'messages') and 'reference' "
                           f"on every line")
    prompts, references = [], []
    for lineno, obj in _jsonl_objects(path, caps):
        where = f"{path.name} line {lineno}"
        if isinstance(obj.get("prompt"), str) and obj["prompt"]:
            prompts.append(caps.text(obj["prompt"], where))
        elif isinstance(obj.get("messages"), list) and obj["messages"]:
            check_message_shapes(obj["messages"], where)
            prompts.append([{"role": m["role"], "content": caps.text(m["content"], where)} for m in obj["messages"]])
        else:
            raise ScoringError(f"{where} has neither a non-empty 'prompt' string nor a 'messages' list")
        ref = obj.get("reference")
        if isinstance(ref, str):
            references.append(caps.text(ref, where))
        elif isinstance(ref, list) and ref and all(isinstance(r, str) for r in ref):
            references.append([caps.text(r, where) for r in ref])
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
    path, _ = checked_file(path)                  # our checks and size cap first, then the training reader's
    caps = limits.current()
    records = read_records(path, task="classify", max_rows=caps.max_eval_rows, max_chars=caps.max_eval_chars)
    return LabelledSet(path, records.sha256, [t for t, _ in records.items], [label for _, label in records.items],
                       records.labels)

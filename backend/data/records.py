"""Training-format data files, read and checked before any tokenizer runs (with task "auto" the task is taken
from the file):

- **Plain text** (`.txt`, or any UTF-8 text file; task `lm`): the whole file is one document.
- **Text JSONL** (`.jsonl`; task `lm`): one `{"text": "..."}` per line.
- **Chat JSONL** (`.jsonl`; task `chat`): one `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."},
  ...]}` per line, with at least one assistant message.
- **Labelled JSONL or CSV** (`.jsonl` / `.csv`; task `classify`): `{"text": ..., "label": ...}` per line, or a CSV
  whose header has `text` and `label` columns; at least two labels.

Finetuning tokenizes them (backend/training/data.py); an evaluation reads its labelled sets with the same reader,
so a file that finetunes also evaluates. Every problem raises DataError naming the file and the line."""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import limits
from .files import (JSONL_SUFFIXES, DataError, RowCaps, check_message_shapes, jsonl_objects, read_text, scan_utf8,
                    text_lines)


@dataclass
class Records:
    """A data file read and checked, not yet tokenized."""
    path: Path
    task: str                  # lm | chat | classify
    text: str | None = None    # lm from a plain text file
    items: list = field(default_factory=list)  # lm: documents; chat: message lists; classify: (text, label) pairs
    sha256: str = ""           # of the file's bytes (the evaluation history's fingerprint)

    @property
    def corpus(self) -> str:
        """All the text (to train a tokenizer on)."""
        if self.text is not None:
            return self.text
        if self.task == "chat":
            return "\n".join(m["content"] for conv in self.items for m in conv)
        if self.task == "classify":
            return "\n".join(f"{t}\n{label}" for t, label in self.items)
        return "\n".join(self.items)

    @property
    def labels(self) -> list[str]:
        return sorted({label for _, label in self.items}) if self.task == "classify" else []


def read_records(path: str | Path, task: str = "auto", max_rows: int | None = None,
                 max_chars: int | None = None) -> Records:
    """Read and check a data file (no tokenizer needed): its format, and every line of it.

    The file is streamed: checked chunk by chunk (NUL bytes, UTF-8), then parsed line by line, keeping only the
    records (a 300 MiB JSONL once cost ~21x its size as text + lines + JSON objects + copies). `max_rows` (default
    the deployment's `max_data_rows`) and `max_chars` (characters of one text, none by default) are checked while
    reading, which stops at the first row past them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"no data file at {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file; give one .txt, .jsonl or .csv file")
    digest = scan_utf8(path, "train on")
    reading = RowCaps(path, limits.current().max_data_rows if max_rows is None else max_rows, max_chars)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if task not in ("auto", "classify"):
            raise DataError(f"{path.name}: a CSV file is labelled data (task classify), not task {task!r}")
        return Records(path, "classify", items=_read_csv(path, reading), sha256=digest)
    if suffix in JSONL_SUFFIXES:
        records = _read_jsonl(path, task, reading)
        records.sha256 = digest
        return records
    if task in ("chat", "classify"):
        want = "a 'messages' list" if task == "chat" else "'text' and 'label'"
        raise DataError(f"{path.name} is plain text, but task {task!r} needs JSONL with {want} on every line "
                        f"(or a CSV for classify)")
    text = read_text(path)
    reading.text(text, path.name)
    return Records(path, "lm", text=text, sha256=digest)


def _jsonl_task(path: Path, lineno: int, first: dict) -> str:
    task = "chat" if "messages" in first else "classify" if "label" in first else "lm" if "text" in first else ""
    if not task:
        raise DataError(f"{path.name} line {lineno} has none of the keys 'messages' (chat), 'text' and "
                        f"'label' (classify) or 'text' (language modelling)")
    return task


def _read_jsonl(path: Path, task: str, caps: RowCaps) -> Records:
    items, shared = [], {}   # shared: one string object per distinct label
    for lineno, obj in jsonl_objects(path, caps):
        where = f"{path.name} line {lineno}"
        if task == "auto":
            task = _jsonl_task(path, lineno, obj)
        if task == "chat":
            messages = _check_chat(obj.get("messages"), where)
            for m in messages:
                caps.text(m["content"], where)
            items.append(messages)
        elif task == "classify":
            text, label = _check_labelled(obj.get("text"), obj.get("label"), where)
            items.append((caps.text(text, where), shared.setdefault(label, label)))
        else:
            if not isinstance(obj.get("text"), str):
                raise DataError(f"{where} has no 'text' string")
            items.append(caps.text(obj["text"], where))
    if not items:  # e.g. only control characters that str.strip() counts as blank
        raise DataError(f"{path.name} has no JSON lines, only blank space or control characters")
    if task == "lm" and not any(t.strip() for t in items):
        raise DataError(f"{path.name} has no text to train on")
    if task == "classify":
        _check_label_set(path, items)
    return Records(path, task, items=items)


def _check_chat(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where} has no 'messages' list")
    check_message_shapes(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where} has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_labelled(text, label, where: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where} has no 'text'")
    if label is None or isinstance(label, (dict, list)) or not str(label).strip():
        raise DataError(f"{where} has no label (a non-empty 'label' is needed on every row)")
    return text.strip(), str(label).strip()


def _read_csv(path: Path, caps: RowCaps) -> list[tuple[str, str]]:
    # Lines split on "\n" only, as io.StringIO(text) split them before (the csv module handles "\r" itself).
    reader = csv.DictReader(line for _, line in text_lines(path))
    items, shared = [], {}
    try:
        header = reader.fieldnames or []
        if "text" not in header or "label" not in header:
            raise DataError(f"{path.name}: the CSV header must have 'text' and 'label' columns; it has "
                            f"{', '.join(map(repr, header)) or 'none'}")
        for row in reader:
            caps.row()
            where = f"{path.name} line {reader.line_num}"
            text, label = _check_labelled(row.get("text"), row.get("label"), where)
            items.append((caps.text(text, where), shared.setdefault(label, label)))
    except csv.Error as e:
        raise DataError(f"{path.name} line {reader.line_num} is not valid CSV: {e}") from e
    _check_label_set(path, items)
    return items


def _check_label_set(path: Path, items: list[tuple[str, str]]):
    if not items:
        raise DataError(f"{path.name} has no rows to train on (a header alone is not data)")
    labels = Counter(label for _, label in items)
    if len(labels) < 2:
        raise DataError(f"{path.name} has only the label {next(iter(labels))!r}: classification needs at least two")

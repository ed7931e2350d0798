"""Reading a user's data file safely: checked chunk by chunk (not empty, no NUL byte, valid UTF-8) before it is
parsed, then streamed line by line, with the row and character caps checked while it is read.

Every problem raises DataError, naming the file and, where there is one, the line. DataError is both a TrainError
and a ScoringError, so a training run and an evaluation each present it as their own error."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import limits
from ..errors import ScoringError, TrainError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SCAN_CHUNK = 1024**2  # bytes checked at a time


class DataError(TrainError, ScoringError):
    """A data file cannot be read: missing, empty, binary, not UTF-8, malformed, past a cap."""


def scan_utf8(path: Path, purpose: str) -> str:
    """Check a file chunk by chunk — not empty, no NUL byte, valid UTF-8 — holding one chunk at a time; returns the
    sha256 of its bytes. `purpose` completes "there is nothing to ..."."""
    digest, offset, carry, content = hashlib.sha256(), 0, b"", False
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            digest.update(chunk)
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise DataError(f"{path.name} looks like a binary file (a NUL byte at offset {offset + nul}), not "
                                f"UTF-8 text")
            data, start = carry + chunk, offset - len(carry)
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if e.end != len(data) or len(data) - e.start > 3:   # not just a character cut by the chunk's end
                    raise DataError(f"{path.name} is not UTF-8 text (an invalid byte at offset {start + e.start})"
                                    ) from e
                carry = data[e.start:]
            content = content or bool(chunk.strip())
            offset += len(chunk)
    if not content:
        raise DataError(f"{path.name} is empty: there is nothing to {purpose}")
    if carry:
        raise DataError(f"{path.name} is not UTF-8 text (an invalid byte at offset {offset - len(carry)})")
    return digest.hexdigest()


def read_text(path: Path) -> str:
    """A file already checked by scan_utf8, as one string (its byte order mark dropped)."""
    with open(path, encoding="utf-8", newline="") as f:   # no newline translation: the text as the bytes say
        return f.read().removeprefix("\ufeff")


def text_lines(path: Path):
    """(line number, text) of each line of a file already checked by scan_utf8, split on "\\n" only (not
    splitlines(): U+2028 may stand raw inside a JSON string), read one at a time."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8")
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def deployment() -> str:
    return "public" if limits.public_mode() else "local"


class RowCaps:
    """The row and character caps of one file, checked while it is read (so reading stops at the first row past
    them, before the rest is parsed)."""

    def __init__(self, path: Path, max_rows: int | None, max_chars: int | None = None):
        self.name, self.max_rows, self.max_chars, self.rows = path.name, max_rows, max_chars, 0

    def row(self) -> None:
        self.rows += 1
        if self.max_rows is not None and self.rows > self.max_rows:
            raise DataError(f"{self.name} has more than {self.max_rows:,} rows, the most this {deployment()} "
                            f"deployment reads from one file")

    def text(self, text: str, where: str) -> str:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise DataError(f"{where} is {len(text):,} characters long, but this {deployment()} deployment allows "
                            f"at most {self.max_chars:,} characters per text")
        return text


def jsonl_objects(path: Path, caps: RowCaps | None = None):
    """(line number, object) of each non-blank line of a checked JSONL file, parsed one line at a time."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        if caps is not None:
            caps.row()
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path.name} line {lineno} is not a JSON object")
        yield lineno, obj


def check_message_shapes(messages: list, where: str) -> None:
    """Every chat message is {'role': str, 'content': str}."""
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i + 1} must be {{'role': str, 'content': str}}")

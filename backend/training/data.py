"""Training data: read and check a file, then tokenize it into sequences with a loss mask.

Formats (with task "auto" the task is taken from the file):

- **Plain text** (`.txt`, or any UTF-8 text file; task `lm`): the whole file is one document. It is tokenized once
  and cut into blocks of seq_len + 1 tokens that overlap by one token (inputs block[:-1], targets block[1:]), so every
  token is a target exactly once. The last `val_fraction` of the blocks (the tail of the text) is the validation set.
- **Text JSONL** (`.jsonl`; task `lm`): one `{"text": "..."}` per line; the documents are joined with the tokenizer's
  end-of-sequence token and packed as above.
- **Chat JSONL** (`.jsonl`; task `chat`): one `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."},
  ...]}` per line. Each conversation is rendered with the model's chat template (the fallback "Role: content" template
  when it has none) and is one sequence, cut at seq_len + 1 tokens. The loss is on the assistant turns only, including
  the template's end-of-turn token, so the model learns to answer and to stop; system and user tokens are context.
- **Labelled JSONL or CSV** (`.jsonl` / `.csv`; task `classify`): `{"text": ..., "label": ...}` per line, or a CSV
  whose header has `text` and `label` columns. Each row becomes the prompt `"<text>\\nLabel:"` followed by
  `" <label>"` and end-of-sequence; the loss is on the label tokens only. The validation split is stratified by label
  and scored by accuracy and macro-F1 (see backend/scoring/validation.py).

Every problem a user can cause (missing or empty file, binary data, a malformed line, a missing label, too little
data) raises TrainError naming the file and, where there is one, the line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .. import limits
from ..errors import FornaxError, TrainError
from ..formats.tokenizer import Tokenizer

IGNORE = -100                 # target id that cross_entropy skips
MAX_VAL_SEQUENCES = 256       # validation loss is averaged over at most this many sequences
MAX_VAL_RECORDS = 200         # classification metrics over at most this many labelled rows
CLASSIFY_PROMPT = "{text}\nLabel:"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


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
        raise TrainError(f"no data file at {path}")
    if not path.is_file():
        raise TrainError(f"{path} is not a file; give one .txt, .jsonl or .csv file")
    digest = scan_utf8(path, TrainError, "train on")
    reading = RowCaps(path, TrainError, limits.current().max_data_rows if max_rows is None else max_rows, max_chars)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if task not in ("auto", "classify"):
            raise TrainError(f"{path.name}: a CSV file is labelled data (task classify), not task {task!r}")
        return Records(path, "classify", items=_read_csv(path, reading), sha256=digest)
    if suffix in JSONL_SUFFIXES:
        records = _read_jsonl(path, task, reading)
        records.sha256 = digest
        return records
    if task in ("chat", "classify"):
        want = "a 'messages' list" if task == "chat" else "'text' and 'label'"
        raise TrainError(f"{path.name} is plain text, but task {task!r} needs JSONL with {want} on every line "
                         f"(or a CSV for classify)")
    text = read_text(path)
    reading.text(text, path.name)
    return Records(path, "lm", text=text, sha256=digest)


SCAN_CHUNK = 1024**2  # bytes checked at a time


def scan_utf8(path: Path, error: type[FornaxError], purpose: str) -> str:
    """Check a file chunk by chunk — not empty, no NUL byte, valid UTF-8 — holding one chunk at a time; returns the
    sha256 of its bytes. `purpose` completes "there is nothing to ..."."""
    digest, offset, carry, content = hashlib.sha256(), 0, b"", False
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            digest.update(chunk)
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise error(f"{path.name} looks like a binary file (a NUL byte at offset {offset + nul}), not UTF-8 "
                            f"text")
            data, start = carry + chunk, offset - len(carry)
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if e.end != len(data) or len(data) - e.start > 3:   # not just a character cut by the chunk's end
                    raise error(f"{path.name} is not UTF-8 text (an invalid byte at offset {start + e.start})") from e
                carry = data[e.start:]
            content = content or bool(chunk.strip())
            offset += len(chunk)
    if not content:
        raise error(f"{path.name} is empty: there is nothing to {purpose}")
    if carry:
        raise error(f"{path.name} is not UTF-8 text (an invalid byte at offset {offset - len(carry)})")
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


class RowCaps:
    """The row and character caps of one file, checked while it is read (so reading stops at the first row past
    them, before the rest is parsed)."""

    def __init__(self, path: Path, error: type[FornaxError], max_rows: int | None, max_chars: int | None = None):
        self.name, self.error, self.max_rows, self.max_chars, self.rows = path.name, error, max_rows, max_chars, 0

    def row(self) -> None:
        self.rows += 1
        if self.max_rows is not None and self.rows > self.max_rows:
            raise self.error(f"{self.name} has more than {self.max_rows:,} rows, the most this "
                             f"{'public' if limits.public_mode() else 'local'} deployment reads from one file")

    def text(self, text: str, where: str) -> str:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise self.error(f"{where} is {len(text):,} characters long, but this "
                             f"{'public' if limits.public_mode() else 'local'} deployment allows at most "
                             f"{self.max_chars:,} characters per text")
        return text


def jsonl_objects(path: Path, error: type[FornaxError], caps: RowCaps | None = None):
    """(line number, object) of each non-blank line of a checked JSONL file, parsed one line at a time."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        if caps is not None:
            caps.row()
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path.name} line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise error(f"{path.name} line {lineno} is not a JSON object")
        yield lineno, obj


def _jsonl_task(path: Path, lineno: int, first: dict) -> str:
    task = "chat" if "messages" in first else "classify" if "label" in first else "lm" if "text" in first else ""
    if not task:
        raise TrainError(f"{path.name} line {lineno} has none of the keys 'messages' (chat), 'text' and "
                         f"'label' (classify) or 'text' (language modelling)")
    return task


def _read_jsonl(path: Path, task: str, caps: RowCaps) -> Records:
    items, shared = [], {}   # shared: one string object per distinct label
    for lineno, obj in jsonl_objects(path, TrainError, caps):
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
                raise TrainError(f"{where} has no 'text' string")
            items.append(caps.text(obj["text"], where))
    if not items:  # e.g. only control characters that str.strip() counts as blank
        raise TrainError(f"{path.name} has no JSON lines, only blank space or control characters")
    if task == "lm" and not any(t.strip() for t in items):
        raise TrainError(f"{path.name} has no text to train on")
    if task == "classify":
        _check_label_set(path, items)
    return Records(path, task, items=items)


def _check_chat(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TrainError(f"{where} has no 'messages' list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TrainError(f"{where}: message {i + 1} must be {{'role': str, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainError(f"{where} has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_labelled(text, label, where: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise TrainError(f"{where} has no 'text'")
    if label is None or isinstance(label, (dict, list)) or not str(label).strip():
        raise TrainError(f"{where} has no label (a non-empty 'label' is needed on every row)")
    return text.strip(), str(label).strip()


def _read_csv(path: Path, caps: RowCaps) -> list[tuple[str, str]]:
    # Lines split on "\n" only, as io.StringIO(text) split them before (the csv module handles "\r" itself).
    reader = csv.DictReader(line for _, line in text_lines(path))
    items, shared = [], {}
    try:
        header = reader.fieldnames or []
        if "text" not in header or "label" not in header:
            raise TrainError(f"{path.name}: the CSV header must have 'text' and 'label' columns; it has "
                             f"{', '.join(map(repr, header)) or 'none'}")
        for row in reader:
            caps.row()
            where = f"{path.name} line {reader.line_num}"
            text, label = _check_labelled(row.get("text"), row.get("label"), where)
            items.append((caps.text(text, where), shared.setdefault(label, label)))
    except csv.Error as e:
        raise TrainError(f"{path.name} line {reader.line_num} is not valid CSV: {e}") from e
    _check_label_set(path, items)
    return items


def _check_label_set(path: Path, items: list[tuple[str, str]]):
    if not items:
        raise TrainError(f"{path.name} has no rows to train on (a header alone is not data)")
    labels = Counter(label for _, label in items)
    if len(labels) < 2:
        raise TrainError(f"{path.name} has only the label {next(iter(labels))!r}: classification needs at least two")


# --- tokenized ---
@dataclass
class Sequences:
    """Token sequences with a loss mask: token i is a target (predicted from tokens < i) iff mask[i]."""
    ids: list[torch.Tensor] = field(default_factory=list)    # each (L,) int64
    mask: list[torch.Tensor] = field(default_factory=list)   # each (L,) bool; mask[0] is never used

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: list[int], mask: list[bool]):
        self.ids.append(torch.tensor(ids, dtype=torch.long))
        self.mask.append(torch.tensor(mask, dtype=torch.bool))

    def subset(self, index: list[int]) -> "Sequences":
        return Sequences([self.ids[i] for i in index], [self.mask[i] for i in index])

    def batch(self, index: list[int], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded inputs x (B, L) and targets y (B, L), y = IGNORE where there is no loss (and on padding)."""
        L = max(len(self.ids[i]) for i in index) - 1
        x = torch.full((len(index), L), pad_id, dtype=torch.long)
        y = torch.full((len(index), L), IGNORE, dtype=torch.long)
        for b, i in enumerate(index):
            ids, mask = self.ids[i], self.mask[i]
            n = len(ids) - 1
            x[b, :n] = ids[:-1]
            y[b, :n] = torch.where(mask[1:], ids[1:], IGNORE)
        return x, y

    @property
    def n_targets(self) -> int:
        return int(sum(m[1:].sum() for m in self.mask))


@dataclass
class Data:
    task: str
    train: Sequences
    val: Sequences
    prompts: list[str]                   # default sample prompts (chat: a user message)
    labels: list[str] = field(default_factory=list)              # classify: the label set
    val_records: list[tuple[str, str]] = field(default_factory=list)  # classify: (text, label) scored for metrics
    summary: str = ""


def eos_id(tokenizer: Tokenizer) -> int | None:
    return tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None


def build_data(records: Records, tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int) -> Data:
    """Tokenize checked records into training and validation sequences of at most seq_len + 1 tokens."""
    build = {"lm": _build_lm, "chat": _build_chat, "classify": _build_classify}[records.task]
    try:
        return build(records, tokenizer, seq_len, val_fraction, seed)
    except FornaxError as e:
        raise TrainError(str(e)) from e


def _n_val(n: int, val_fraction: float) -> int:
    if n < 2 or val_fraction <= 0:
        return 0
    return min(n - 1, max(1, round(n * val_fraction)))


def _build_lm(records: Records, tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int) -> Data:
    eos = eos_id(tokenizer)
    docs = [records.text] if records.text is not None else [d for d in records.items if d.strip()]
    ids: list[int] = []
    for enc in tokenizer.tk.encode_batch(docs):
        ids += enc.ids + ([eos] if eos is not None else [])
    T = seq_len
    n_blocks = (len(ids) - 1) // T
    if n_blocks < 1:
        raise TrainError(f"{records.path.name} is {len(ids)} tokens long, shorter than one training block of "
                         f"{T + 1} tokens: use more text or a smaller seq_len")
    seqs = Sequences()
    for b in range(n_blocks):
        block = ids[b * T: b * T + T + 1]          # overlaps the next block by one token
        seqs.add(block, [True] * len(block))
    n_val = _n_val(n_blocks, val_fraction)
    train, val = seqs.subset(list(range(n_blocks - n_val))), seqs.subset(list(range(n_blocks - n_val, n_blocks)))
    source = val if len(val) else train
    prompts = []
    for i in sorted({0, len(source) // 2}):  # a few whole words from the start of a (validation) block
        words = tokenizer.decode(source.ids[i][:32].tolist(), skip_special_tokens=True).split(" ")
        prompts.append(" ".join(words[1:6] if len(words) > 6 else words).strip())
    return Data("lm", train, val, [p for p in prompts if p] or ["The"],
                summary=f"{len(ids)} tokens -> {len(train)} training + {len(val)} validation blocks of {T} tokens")


def chat_sequence(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and the mask of its assistant tokens.

    Each assistant turn i is located by rendering messages[:i] with the generation prompt (the text just before the
    reply) and messages[:i + 1] (the text just after it): the tokens in between are the reply and its end-of-turn
    marker. This needs the template to be prefix-stable (an earlier turn renders the same in a longer chat); a
    template that rewrites earlier turns is refused rather than masked wrongly."""
    full = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True) if i else []
        after = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if after[:len(before)] != before or full[:len(after)] != after:
            raise TrainError("the model's chat template renders earlier turns differently in longer chats, so the "
                             "assistant tokens cannot be located; chat training needs a prefix-stable template")
        for j in range(len(before), len(after)):
            mask[j] = True
    return full, mask


def _build_chat(records: Records, tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int) -> Data:
    seqs, cut, dropped, kept = Sequences(), 0, 0, []  # kept: the conversation behind each sequence
    for messages in records.items:
        ids, mask = chat_sequence(tokenizer, messages)
        if len(ids) > seq_len + 1:
            ids, mask, cut = ids[:seq_len + 1], mask[:seq_len + 1], cut + 1
        if not any(mask[1:]):
            dropped += 1
            continue
        seqs.add(ids, mask)
        kept.append(messages)
    if not len(seqs):
        raise TrainError(f"{records.path.name}: no conversation has an assistant token within the first "
                         f"{seq_len + 1} tokens; use a larger seq_len")
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    n_val = _n_val(len(order), val_fraction)
    val, train = seqs.subset(sorted(order[:n_val])), seqs.subset(sorted(order[n_val:]))
    first = kept[sorted(order[:n_val])[0] if n_val else 0]
    prompts = [next(m["content"] for m in first if m["role"] == "user")] if any(
        m["role"] == "user" for m in first) else ["Hello!"]
    notes = (f", {cut} cut at {seq_len + 1} tokens" if cut else "") + (
        f", {dropped} dropped (no assistant token left)" if dropped else "")
    return Data("chat", train, val, prompts, summary=f"{len(records.items)} conversations -> {len(train)} training + "
                f"{len(val)} validation ({train.n_targets} assistant tokens to learn{notes})")


def classify_example(tokenizer: Tokenizer, text: str, label: str | None, seq_len: int
                     ) -> tuple[list[int], list[int]]:
    """(prompt ids, label ids + end-of-sequence) for one row; the prompt loses its start if the row is too long."""
    answer = tokenizer.encode(" " + label, add_special_tokens=False) if label is not None else []
    eos = eos_id(tokenizer)
    answer += [eos] if eos is not None and label is not None else []
    prompt = tokenizer.encode(CLASSIFY_PROMPT.format(text=text))
    room = seq_len + 1 - len(answer)
    if room < 1:
        raise TrainError(f"the label {label!r} alone is {len(answer)} tokens, more than seq_len allows")
    return prompt[-room:], answer


def stratified_val_index(items: list[tuple[str, str]], val_fraction: float, seed: int) -> list[int]:
    """The rows of a labelled file held out for validation, every label in proportion (sorted). The causal (label
    words) and the encoder (classification head) paths share it, so both are scored on the same rows."""
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(items):
        by_label.setdefault(label, []).append(i)
    rng = random.Random(seed)
    val_index = []
    for label in sorted(by_label):
        index = by_label[label]
        rng.shuffle(index)
        val_index += index[:_n_val(len(index), val_fraction)]
    return sorted(val_index)


def _build_classify(records: Records, tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int) -> Data:
    val_index = stratified_val_index(records.items, val_fraction, seed)
    val_set = set(val_index)
    train, val = Sequences(), Sequences()
    for i, (text, label) in enumerate(records.items):
        prompt, answer = classify_example(tokenizer, text, label, seq_len)
        (val if i in val_set else train).add(prompt + answer, [False] * len(prompt) + [True] * len(answer))
    val_records = [records.items[i] for i in val_index][:MAX_VAL_RECORDS]
    prompts = [CLASSIFY_PROMPT.format(text=t) for t, _ in (val_records or records.items)[:2]]
    counts = Counter(label for _, label in records.items)
    return Data("classify", train, val, prompts, labels=sorted(counts), val_records=val_records,
                summary=f"{len(records.items)} rows, labels {dict(sorted(counts.items()))} -> {len(train)} training "
                        f"+ {len(val)} validation")


class EncoderBatch(NamedTuple):
    ids: torch.Tensor                    # (B, T) right-padded
    attention_mask: torch.Tensor         # (B, T) 1 on tokens, 0 on padding
    token_types: torch.Tensor            # (B, T) 0 = first segment, 1 = second
    labels: torch.Tensor                 # (B,) class index (classify) or 0 next / 1 random (next-sentence)


@dataclass
class EncoderExamples:
    """Whole encoder inputs ([CLS] ... [SEP], maybe a second segment) with one label each."""
    ids: list[torch.Tensor] = field(default_factory=list)     # each (L,) int64
    types: list[torch.Tensor] = field(default_factory=list)   # each (L,) int64
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: list[int], label: int, types: list[int] | None = None):
        self.ids.append(torch.tensor(ids, dtype=torch.long))
        self.types.append(torch.tensor(types if types is not None else [0] * len(ids), dtype=torch.long))
        self.labels.append(label)

    def batch(self, index: list[int], pad_id: int = 0) -> EncoderBatch:
        T = max(len(self.ids[i]) for i in index)
        ids = torch.full((len(index), T), pad_id, dtype=torch.long)
        types = torch.zeros((len(index), T), dtype=torch.long)
        mask = torch.zeros((len(index), T), dtype=torch.long)
        for b, i in enumerate(index):
            n = len(self.ids[i])
            ids[b, :n], types[b, :n], mask[b, :n] = self.ids[i], self.types[i], 1
        return EncoderBatch(ids, mask, types, torch.tensor([self.labels[i] for i in index], dtype=torch.long))

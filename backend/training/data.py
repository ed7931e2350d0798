"""Training data: checked records (backend/data/records.py reads the file) tokenized into sequences with a loss
mask (backend/data/sequences.py).

- **Plain text** (`.txt`; task `lm`): the whole file is one document. It is tokenized once and cut into blocks of
  seq_len + 1 tokens that overlap by one token (inputs block[:-1], targets block[1:]), so every token is a target
  exactly once. The last `val_fraction` of the blocks (the tail of the text) is the validation set.
- **Text JSONL** (task `lm`): the documents are joined with the tokenizer's end-of-sequence token and packed as above.
- **Chat JSONL** (task `chat`): each conversation is rendered with the model's chat template (the fallback "Role:
  content" template when it has none) and is one sequence, cut at seq_len + 1 tokens. The loss is on the assistant
  turns only, including the template's end-of-turn token, so the model learns to answer and to stop; system and
  user tokens are context.
- **Labelled JSONL or CSV** (task `classify`): each row becomes the prompt `"<text>\\nLabel:"` followed by
  `" <label>"` and end-of-sequence (backend/data/labels.py); the loss is on the label tokens only. The validation
  split is stratified by label and scored by accuracy and macro-F1 (see validation.py).

Every problem a user can cause (too little data, a template that cannot be masked) raises TrainError.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from ..data.labels import CLASSIFY_PROMPT, classify_example, eos_id
from ..data.records import Records
from ..data.sequences import Sequences
from ..errors import FornaxError, TrainError
from ..formats.tokenizer import Tokenizer

MAX_VAL_SEQUENCES = 256       # validation loss is averaged over at most this many sequences
MAX_VAL_RECORDS = 200         # classification metrics over at most this many labelled rows


@dataclass
class Data:
    task: str
    train: Sequences
    val: Sequences
    prompts: list[str]                   # default sample prompts (chat: a user message)
    labels: list[str] = field(default_factory=list)              # classify: the label set
    val_records: list[tuple[str, str]] = field(default_factory=list)  # classify: (text, label) scored for metrics
    summary: str = ""


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

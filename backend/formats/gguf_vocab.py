"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers.Tokenizer`: byte-level BPE from the file's
merges, or SentencePiece BPE with its merges recovered from the piece scores, as llama.cpp's llama-vocab.cpp and
transformers' converters read `tokenizer.ggml.*`."""
from __future__ import annotations

from functools import lru_cache

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .. import limits
from ..errors import ModelLoadError, UnsupportedModelError

# (tokenizer, bos, eos, chat template, {"unk_token": ..., "pad_token": ...}): what `Tokenizer(...)` takes
Parts = tuple[HFTokenizer, str | None, str | None, str | None, dict]


def rebuild(meta: dict) -> Parts:
    """The tokenizer a GGUF file describes (`tokenizer.ggml.*`), as the arguments of `Tokenizer(...)`."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return sentencepiece(meta)
    if kind != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer type {kind!r} is not supported ('gpt2' byte-level BPE and "
                                    f"'llama' SentencePiece BPE are)")
    return byte_level_bpe(meta)


def byte_level_bpe(meta: dict) -> Parts:
    """GPT-2-style byte-level BPE (SmolLM, Llama 3, Qwen2): the merges are in the file; the split before BPE
    follows `tokenizer.ggml.pre`."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    # Every real token of a byte-level vocabulary is spelled in the byte alphabet; respell any that is not.
    alphabet = frozenset(pre_tokenizers.ByteLevel.alphabet())  # (built once: per token it cost 0.3 s at 49k)
    byte_map = _bytes_to_unicode()
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if alphabet.issuperset(t) else "".join(byte_map[b] for b in t.encode()), i)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    split = GGUF_PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", "default"), None)
    if split == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif split:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # CONTROL (3) tokens are special; USER_DEFINED (4) are matched whole but are not special.
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, ty in zip(tokens, types) if ty == 3 and alphabet.issuperset(t)])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4])

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = tok("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    extra = {n: tok(k) for n, k in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")) if tok(k)}
    return tk, bos, tok("eos_token_id"), meta.get("tokenizer.chat_template"), extra

def sentencepiece(meta: dict) -> Parts:
    """SentencePiece BPE (Llama 2, TinyLlama, Mistral): merges recovered from the piece scores, byte fallback,
    "▁" for spaces, built as transformers' LlamaTokenizer builds it."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = merges_from_scores(vocab, dict(zip(tokens, scores)))

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tok("unknown_token_id"), fuse_unk=True,
                                byte_fallback=True))
    prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix_space else "never",
                                                split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix_space else []))
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4])
    bos = tok("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", True) and bos:  # llama.cpp's default for this vocabulary
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    extra = {n: tok(k) for n, k in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")) if tok(k)}
    return tk, bos, tok("eos_token_id"), meta.get("tokenizer.chat_template"), extra


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces of the vocabulary,
    best-scored piece first (the order transformers' converter uses).

    The work is sum(len(piece)^2) character hashes and the result can be n^2/2 merges ("a", "aa", ... "a"*5000
    gives 12.5 M), so both are bounded by the caps of backend.limits before and while the list is built."""
    caps = limits.current()
    work = sum(len(p) * len(p) for p in scores)
    if work > caps.max_merge_work:
        longest = max(scores, key=len)
        raise ModelLoadError(f"the SentencePiece vocabulary's pieces are too long to derive merges from "
                             f"(sum of squared lengths {work:,} > {caps.max_merge_work:,}; the longest piece has "
                             f"{len(longest):,} characters)")
    n_merges = held = 0  # counted first, nothing kept: the list itself would hold `held` characters
    for piece in scores:
        for i in range(1, len(piece)):
            if piece[:i] in vocab and piece[i:] in vocab:
                n_merges, held = n_merges + 1, held + len(piece)
        if n_merges > caps.max_merges or held > caps.max_merge_work:
            raise ModelLoadError(f"the SentencePiece vocabulary implies more than {caps.max_merges:,} merges or "
                                 f"{caps.max_merge_work:,} characters of them (a vocabulary built to explode, e.g. "
                                 f"'a', 'aa', 'aaa', ...)")
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> how text is split before BPE, as llama.cpp's llama-vocab.cpp does it.
# None: GPT-2's own split; "digits": every digit alone, then GPT-2's split (StarCoder / SmolLM family).
GGUF_PRE_TOKENIZER_SPLITS = {
    "default": None, "gpt-2": None, "gpt2": None,
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits", "command-r": "digits",
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
